"""brainmirror: symmetry-informed unsupervised anomaly detection for brain MRI.

The computing core. It imports no Holoscan: the MONAI Deploy operators in ``operators/``
call into it.
"""

__version__ = "0.1.0"
ALGORITHM_NAME = "brainmirror"
NOT_FOR_CLINICAL_USE = "NOT FOR CLINICAL USE"
