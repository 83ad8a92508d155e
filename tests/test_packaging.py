"""The distribution installs one import namespace, ``firempo_kernels``, with every source folder in it."""

import pathlib
import shutil
import subprocess
import sys
import zipfile

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_wheel_holds_one_namespace_and_every_package(tmp_path):
    # Built from a copy without the checkout's build/ folder, whose stale files setuptools would package too.
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "build", "runs", "*.egg-info",
                                                                 "__pycache__", ".pytest_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path), str(source)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("firempo_kernels-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"firempo_kernels"}
    for folder, package in (("csrc_triton", "csrc_triton"), ("integrations", "integrations")):
        for init in (ROOT / folder).rglob("__init__.py"):
            assert f"firempo_kernels/{package}/{init.relative_to(ROOT / folder).as_posix()}" in names
    for config in (ROOT / "integrations" / "configs").rglob("*"):  # every shipped config, sub-folders too
        if config.is_file():
            assert f"firempo_kernels/integrations/configs/{config.relative_to(ROOT / 'integrations/configs').as_posix()}" in names
