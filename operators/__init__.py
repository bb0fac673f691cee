"""MONAI Deploy operators of the brainmirror application: thin wrappers around ``brainmirror``."""

from .common import DetectorProvider, ExitCode, RunStatus, SourceStudy, bundle_exists, timed
from .embedding import EmbeddingOperator
from .loader import StudyLoaderOperator
from .preprocess import PreprocessOperator
from .reconstruction import ReconstructionOperator
from .scoring import ScoringOperator
from .series_selector import DEFAULT_RULES, BrainSeriesSelectorOperator, load_rules
from .slicer import SlicerOperator
from .writer import AssessmentWriterOperator

__all__ = [
    "AssessmentWriterOperator",
    "BrainSeriesSelectorOperator",
    "DEFAULT_RULES",
    "DetectorProvider",
    "EmbeddingOperator",
    "ExitCode",
    "PreprocessOperator",
    "ReconstructionOperator",
    "RunStatus",
    "ScoringOperator",
    "SlicerOperator",
    "SourceStudy",
    "StudyLoaderOperator",
    "bundle_exists",
    "load_rules",
    "timed",
]
