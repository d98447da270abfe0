"""Standard KD (Hinton et al., 2015), the WHITE-BOX reference row: students trained on the teacher's logits.

It needs what DB3KD does without (the model file and its scores), so it is an upper reference, not a
label-only method. This is the one module that uses `db3kd.whitebox` (an import contract enforces it); the
CLI's `train-student --labels whitebox-logits` and recipes' `standard-kd` baseline come through here.
"""

from __future__ import annotations

import numpy as np

from .errors import ConfigError
from .teachers import TeacherSpec
from .transfer import TransferCost, TransferSet
from .whitebox import WhiteBoxTeacher, logits_in_batches


def standard_kd_transfer(teacher: TeacherSpec | str, images: np.ndarray, source: str,
                         cost: TransferCost = TransferCost()) -> TransferSet:
    """`images` with the teacher's logits as soft labels and its top-1 as hard labels (as for every student).

    `cost`: the label queries that made the images (pseudo samples), if any; reading logits sends none.
    """
    spec = TeacherSpec.parse(teacher)
    if not spec.is_file:
        raise ConfigError(f"standard KD reads the teacher's logits, which a label service does not give "
                          f"({spec.text}): pass the teacher's model.pt or model.onnx")
    logits = logits_in_batches(WhiteBoxTeacher.from_file(spec.text), images).astype(np.float32)
    return TransferSet(images, logits.argmax(axis=1).astype(np.int64), logits, cost, source, white_box=True)
