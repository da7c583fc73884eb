"""Silence two third-party log lines that every tlcm command would print and that say nothing about the user's run.

* transformers 5, without torchvision, logs that ``CLIPImageProcessor``/``SiglipImageProcessor`` fall back to their
  PIL versions when diffusers' pipeline modules merely import them (tlcm never uses an image processor).
* diffusers logs "Expected types for text_encoder: CLIPTextModel, got BertModel" when loading the toy teacher, whose
  text encoder is a MiniLM (a BERT) by design.

Each filter drops exactly that message on exactly that logger; everything else those libraries log is untouched.
Installed when :mod:`tlcm` is imported (stdlib logging only: nothing heavy is imported).
"""

from __future__ import annotations

import logging


class _DropMessage(logging.Filter):
    def __init__(self, *needles: str):
        super().__init__()
        self.needles = needles

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is not ours to judge
            return True
        return not all(n in message for n in self.needles)


_FILTERS = {
    "transformers.utils.import_utils": _DropMessage("requires torchvision (not installed)", "falling back to"),
    "diffusers.pipelines.pipeline_utils": _DropMessage("Expected types for text_encoder", "BertModel"),
}


def install() -> None:
    for name, flt in _FILTERS.items():
        logger = logging.getLogger(name)
        if flt not in logger.filters:
            logger.addFilter(flt)
