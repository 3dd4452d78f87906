"""Facts about known datasets: license, citation, class names, official file checksums.

The MedMNIST entries are the 2-D datasets of MedMNIST v2/v3, with the task each poses
(``TASKS``: ChestMNIST is multi-label, RetinaMNIST's grades are ordinal); their MD5s are the official values published in the
``medmnist`` package's INFO table (version 3.0.2) for the 28, 64, 128 and 224 pixel files.
The ``medmnist`` source uses them to verify downloads; the report uses the license and
citation. Matching on a file name accepts ``pneumoniamnist.npz`` and ``pneumoniamnist_64.npz``.
An unknown file is reported as unknown, never guessed.
"""

from __future__ import annotations

import re

MEDMNIST_URL = "https://zenodo.org/records/10519652/files/{file}?download=1"
MEDMNIST_V2 = ("Yang J, Shi R, Wei D, et al. MedMNIST v2 - A large-scale lightweight benchmark for 2D and "
               "3D biomedical image classification. Scientific Data 10, 41 (2023). doi:10.1038/s41597-022-01721-8")

# name: (license, class names, {size: md5}, source-dataset citation or None)
MEDMNIST = {
    "pathmnist": ("CC BY 4.0", ["adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle",
                                "normal colon mucosa", "cancer-associated stroma", "colorectal adenocarcinoma epithelium"],
                  {28: "a8b06965200029087d5bd730944a56c1", 64: "55aa9c1e0525abe5a6b9d8343a507616",
                   128: "ac42d08fb904d92c244187169d1fd1d9", 224: "2c51a510bcdc9cf8ddb2af93af1eadec"}, None),
    "chestmnist": ("CC BY 4.0", ["atelectasis", "cardiomegaly", "effusion", "infiltration", "mass", "nodule",
                                 "pneumonia", "pneumothorax", "consolidation", "edema", "emphysema", "fibrosis",
                                 "pleural", "hernia"],
                   {28: "02c8a6516a18b556561a56cbdd36c4a8", 64: "9de6cd0b934ebb5b7426cfba5efbae16",
                    128: "db107e5590b27930b62dbaf558aebee3", 224: "45bd33e6f06c3e8cdb481c74a89152aa"},
                   "Wang X, Peng Y, Lu L, et al. ChestX-ray8: Hospital-scale chest X-ray database and benchmarks "
                   "on weakly-supervised classification and localization of common thorax diseases. CVPR 2017."),
    "dermamnist": ("CC BY-NC 4.0", ["actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma",
                                    "benign keratosis-like lesions", "dermatofibroma", "melanoma", "melanocytic nevi",
                                    "vascular lesions"],
                   {28: "0744692d530f8e62ec473284d019b0c7", 64: "b70a2f5635c6199aeaa28c31d7202e1f",
                    128: "2defd784463fa5243564e855ed717de1", 224: "8974907d8e169bef5f5b96bc506ae45d"}, None),
    "octmnist": ("CC BY 4.0", ["choroidal neovascularization", "diabetic macular edema", "drusen", "normal"],
                 {28: "c68d92d5b585d8d81f7112f81e2d0842", 64: "e229e9440236b774d9f0dfef9d07bdaf",
                  128: "0a97e76651ace45c5d943ee3f65b63ae", 224: "abc493b6d529d5de7569faaef2773ba3"}, None),
    "pneumoniamnist": ("CC BY 4.0", ["normal", "pneumonia"],
                       {28: "28209eda62fecd6e6a2d98b1501bb15f", 64: "8f4eceb4ccffa70c672198ea285246c6",
                        128: "05b46931834c231683c68f40c47b2971", 224: "d6a3c71de1b945ea11211b03746c1fe1"},
                       "Kermany DS, Goldbaum M, et al. Identifying medical diagnoses and treatable diseases by "
                       "image-based deep learning. Cell 172(5):1122-1131 (2018)."),
    "retinamnist": ("CC BY 4.0", ["0", "1", "2", "3", "4"],
                    {28: "bd4c0672f1bba3e3a89f0e4e876791e4", 64: "afda852cc34dcda56f86ad2b2457dbcc",
                     128: "e48e916a24454daf90583d4e6efb1a18", 224: "eae7e3b6f3fcbda4ae613ebdcbe35348"}, None),
    "breastmnist": ("CC BY 4.0", ["malignant", "normal, benign"],
                    {28: "750601b1f35ba3300ea97c75c52ff8f6", 64: "742edef2a1fd1524b2efff4bd7ba9364",
                     128: "363e4b3f8d712e9b5de15470a2aaadf1", 224: "b56378a6eefa9fed602bb16d192d4c8b"},
                    "Al-Dhabyani W, Gomaa M, Khaled H, Fahmy A. Dataset of breast ultrasound images. "
                    "Data in Brief 28:104863 (2020)."),
    "bloodmnist": ("CC BY 4.0", ["basophil", "eosinophil", "erythroblast", "immature granulocytes", "lymphocyte",
                                 "monocyte", "neutrophil", "platelet"],
                   {28: "7053d0359d879ad8a5505303e11de1dc", 64: "2b94928a2ae4916078ca51e05b6b800b",
                    128: "adace1e0ed228fccda1f39692059dd4c", 224: "b718ff6835fcbdb22ba9eacccd7b2601"}, None),
    "tissuemnist": ("CC BY 4.0", ["Collecting Duct, Connecting Tubule", "Distal Convoluted Tubule",
                                  "Glomerular endothelial cells", "Interstitial endothelial cells", "Leukocytes",
                                  "Podocytes", "Proximal Tubule Segments", "Thick Ascending Limb"],
                    {28: "ebe78ee8b05294063de985d821c1c34b", 64: "123ece2eba09d0aa5d698fda57103344",
                     128: "61b955355d7425a89687b06cca3ce0c2", 224: "b077128c4a949f0a4eb01517f9037b9c"}, None),
    "organamnist": ("CC BY 4.0", ["bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right",
                                  "liver", "lung-left", "lung-right", "pancreas", "spleen"],
                    {28: "68e3f8846a6bd62f0c9bf841c0d9eacc", 64: "2dcccc29b88e6da5a01161ef20cda288",
                     128: "eeae80d0a227a8d099027e1b3cfd3b60", 224: "50747347e05c87dd3aaf92c49f9f3170"}, None),
}

# The task of the MedMNIST sets that are not one class per image (data.task: auto reads it here).
TASKS = {"chestmnist": "multilabel", "retinamnist": "ordinal"}

PHANTOM = {
    "name": "medcnn phantom (simulated scans, generated by pipeline/data/phantom.py)",
    "license": "generated by this project; no third-party rights", "classes": ["normal", "lesion"],
    "citation": ["Generated data: no citation needed."],
}

MEDMNIST_NAMES = tuple(MEDMNIST)


def medmnist_file(name: str, size: int) -> str:
    return f"{name}.npz" if size == 28 else f"{name}_{size}.npz"


def medmnist(name: str) -> dict | None:
    """License, classes, citation and official MD5 per size of a MedMNIST dataset."""
    if name not in MEDMNIST:
        return None
    license_, classes, md5, source = MEDMNIST[name]
    return {"name": f"{name} (MedMNIST)", "license": license_, "classes": classes, "md5": md5, "task": TASKS.get(name),
            "citation": [MEDMNIST_V2] + ([source] if source else ["Source dataset: see the MedMNIST documentation."])}


def lookup(source: str, file_name: str | None) -> dict | None:
    """The catalog entry for a phantom run or a known MedMNIST file name, else None."""
    if source == "phantom":
        return PHANTOM
    if not file_name:
        return None
    return medmnist(re.sub(r"(_\d+)?\.npz$", "", file_name.lower()))
