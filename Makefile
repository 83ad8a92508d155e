# Every target creates .venv (pinned CPU install) when it is missing.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
EXTRAS := dev,hf,deepspeed,peft,bench

.PHONY: demo ablation test bench bench-step bench-step-dpo bench-step-gemma3 bench-busy clean

$(STAMP): setup.py requirements/pins.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	DS_BUILD_OPS=0 $(PY) -m pip install -q -c requirements/pins.txt -e '.[$(EXTRAS)]'
	touch $(STAMP)

# Two workers, whole files each (a file's multi-rank launches share their one-process baselines): the suite's
# launches and single-threaded tests fill two cores in about half the serial time. No test takes over 150 s;
# one that reaches 900 s is stuck and fails, so a hang costs one test, not the run.
test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadfile --timeout 900 tests

bench: $(STAMP)
	$(PY) benchmarks/report.py

bench-step: $(STAMP)
	$(PY) benchmarks/bench_step.py

bench-step-dpo: $(STAMP)
	$(PY) benchmarks/bench_step.py --dpo --prefix 512

bench-step-gemma3: $(STAMP)
	$(PY) benchmarks/bench_step.py --family gemma3

bench-busy: $(STAMP)
	$(PY) benchmarks/busy_check.py

demo: $(STAMP)
	$(PY) -m firempo_kernels.integrations.demo

ablation: $(STAMP)
	$(PY) -m firempo_kernels.integrations.ablation

clean:
	rm -rf $(VENV) build *.egg-info
