"""``pydicom_seg`` for MONAI Label on pydicom 3: the maintained fork ``pydicom-seg-rb`` under the old name.

monailabel 0.8.5 imports ``pydicom_seg`` at start-up; pydicom-seg 0.4.1 (its last release) imports
``pydicom._storage_sopclass_uids``, which pydicom 3 removed (MONAILabel issue 1841), and the
brainmirror core needs pydicom 3. ``pydicom-seg-rb`` is the same package with that import fixed.
"""

import sys

import pydicom_seg_rb
from pydicom_seg_rb import *  # noqa: F401,F403
from pydicom_seg_rb import reader, template, writer  # noqa: F401

__version__ = getattr(pydicom_seg_rb, "__version__", "rb")
for _name in ("reader", "template", "writer", "dicom_utils", "reader_utils", "writer_utils", "segmentation_dataset"):
    sys.modules.setdefault(f"{__name__}.{_name}", sys.modules.get(f"pydicom_seg_rb.{_name}") or getattr(pydicom_seg_rb, _name, None))
