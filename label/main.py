"""MONAI Label app for brainmirror: radiologists review, correct and confirm what brainmirror flags,
and the site recalibrates its thresholds from the confirmed normals.

Start it (from the repository root, with the label server's environment made by scripts/setup.sh):

    label/.venv/bin/python -m monailabel.main start_server --app label --studies <folder or DICOMweb URL> --host 127.0.0.1 --port 8000 [--conf key value ...]

Tasks: infer ``brainmirror``, strategy ``nearest_threshold``, scoring ``brainmirror``, train
``calibrate``. ``python label/main.py --help`` lists the --conf options and the review order.
Research software, NOT FOR CLINICAL USE.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Dict

from lib.activelearning import NearestThreshold
from lib.core import Brainmirror
from lib.datastore import ReviewedDICOMWebDatastore, local_datastore
from lib.infers import BrainmirrorInfer
from lib.scoring import BrainmirrorScoring
from lib.trainers import Calibrate

import monailabel
from monailabel.config import settings
from monailabel.datastore.dicom import DICOMwebClientX
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.random import Random

REPO = Path(__file__).resolve().parent.parent
CONF_HELP = {
    "bundle": f"the shipped model bundle, only read (default {REPO / 'models' / 'brainmirror'})",
    "site_dir": "where calibrate writes brainmirror-site-<date> bundles; the newest one there is the active "
                "bundle (default: the folder holding the shipped bundle)",
    "cache_dir": "cache of preprocessed studies (default ~/.cache/brainmirror/label)",
    "search_filter": 'DICOMweb QIDO filter for the series to review, JSON (default {"Modality": "MR"})',
}
ORDER_HELP = (
    "Review order (strategy nearest_threshold): the unreviewed studies (no final label) sorted by "
    "|score - threshold|, nearest first. The study threshold is a high quantile (1 - FPR) of the "
    "scores of healthy studies; a confirmation near it is the one that moves the recalibrated "
    "threshold, while studies far below it are confidently normal and those far above confidently "
    "abnormal. Confirm a study normal by submitting an empty final label (or label info "
    '{"review": "normal"}); a final label with any region confirms it abnormal, and calibrate never '
    "uses it."
)

logger = logging.getLogger(__name__)


class BrainmirrorApp(MONAILabelApp):
    """brainmirror behind MONAI Label: thin glue around the core in ``lib.core``."""

    def __init__(self, app_dir: str, studies: str, conf: Dict[str, str]):
        bundle = Path(conf.get("bundle", REPO / "models" / "brainmirror"))
        self.core = Brainmirror(
            shipped=bundle,
            site_dir=conf.get("site_dir", bundle.resolve().parent),
            cache_dir=conf.get("cache_dir", Path.home() / ".cache" / "brainmirror" / "label"),
        )
        logger.info("brainmirror: shipped bundle %s, active bundle %s", self.core.shipped, self.core.active_bundle())
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name=f"brainmirror - brain MRI anomaly review (MONAI Label {monailabel.__version__})",
            description="Review, correct and confirm brainmirror's findings; recalibrate on confirmed "
            "normals. Research software, NOT FOR CLINICAL USE.",
            version=monailabel.__version__,
            labels={"anomaly": 1},
        )

    def init_datastore(self) -> Datastore:
        if self.studies.startswith(("http://", "https://")):
            return self.init_remote_datastore()
        return local_datastore(self.studies, settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
                               settings.MONAI_LABEL_DATASTORE_READ_ONLY)

    def init_remote_datastore(self) -> Datastore:
        self.studies = self.studies.rstrip("/").strip()
        session = None
        if settings.MONAI_LABEL_DICOMWEB_USERNAME and settings.MONAI_LABEL_DICOMWEB_PASSWORD:
            from dicomweb_client.session_utils import create_session_from_user_pass

            session = create_session_from_user_pass(settings.MONAI_LABEL_DICOMWEB_USERNAME,
                                                    settings.MONAI_LABEL_DICOMWEB_PASSWORD)
        client = DICOMwebClientX(url=self.studies, session=session,
                                 qido_url_prefix=settings.MONAI_LABEL_QIDO_PREFIX,
                                 wado_url_prefix=settings.MONAI_LABEL_WADO_PREFIX,
                                 stow_url_prefix=settings.MONAI_LABEL_STOW_PREFIX)
        cache = settings.MONAI_LABEL_DATASTORE_CACHE_PATH or settings.MONAI_LABEL_DICOMWEB_CACHE_PATH
        return ReviewedDICOMWebDatastore(
            client=client,
            search_filter=json.loads(self.conf.get("search_filter", '{"Modality": "MR"}')),
            cache_path=cache.strip() or None,
            fetch_by_frame=settings.MONAI_LABEL_DICOMWEB_FETCH_BY_FRAME,
            convert_to_nifti=True,
        )

    def init_infers(self) -> Dict[str, InferTask]:
        return {"brainmirror": BrainmirrorInfer(self.core)}

    def init_strategies(self) -> Dict[str, Strategy]:
        return {"nearest_threshold": NearestThreshold(self.core), "random": Random()}

    def init_scoring_methods(self) -> Dict[str, ScoringMethod]:
        return {"brainmirror": BrainmirrorScoring(self.core)}

    def init_trainers(self) -> Dict[str, TrainTask]:
        return {"calibrate": Calibrate(self.core)}

    def infer(self, request, datastore=None):
        """Run the infer task; a study of the datastore keeps its latest assessment in its image info."""
        result = super().infer(request, datastore)
        image_id = request.get("image")
        store = datastore or self.datastore()
        if isinstance(image_id, str) and not os.path.exists(image_id) and result.get("params"):
            summary = {k: v for k, v in result["params"].items() if k != "label_names"}
            store.update_image_info(image_id, {"brainmirror": summary})
        return result


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="--conf options:\n" + "\n".join(f"  {k:14s}{v}" for k, v in CONF_HELP.items()) + "\n\n" + ORDER_HELP,
    )
    parser.parse_args()


if __name__ == "__main__":
    main()
