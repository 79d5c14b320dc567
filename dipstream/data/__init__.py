"""Text corpora (built-in and local) and the token windows used for evaluation and calibration."""

from dipstream.data.corpora import CORPORA, load_text
from dipstream.data.windows import Windows, make_windows

__all__ = ["CORPORA", "Windows", "load_text", "make_windows"]
