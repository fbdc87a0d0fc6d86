"""What people call TotalSegmentator's classes, in English and Chinese.

Keys are TotalSegmentator class names with the side taken off (`kidney_left` -> `kidney`,
`rib_left_3` -> `rib_3`); the side is added back from the question ("left kidney", 左肾). Numbered
vertebrae and ribs are generated. English phrases match whole words, Chinese ones as substrings.
Pure data and string building: no TotalSegmentator import.
"""

from __future__ import annotations

import re
from typing import Dict, Optional, Tuple

# base key: (English phrases, Chinese phrases); the first English phrase is the plain-word title.
BASE_NAMES: Dict[str, Tuple[Tuple[str, ...], Tuple[str, ...]]] = {
    "spleen": (("spleen", "splenic"), ("脾脏", "脾")),
    "kidney": (("kidney", "kidneys", "renal"), ("肾脏", "肾")),
    "gallbladder": (("gallbladder", "gall bladder"), ("胆囊",)),
    "liver": (("liver", "hepatic"), ("肝脏", "肝")),
    "stomach": (("stomach", "gastric"), ("胃",)),
    "pancreas": (("pancreas", "pancreatic"), ("胰腺", "胰")),
    "adrenal_gland": (("adrenal gland", "adrenal glands", "adrenal", "suprarenal gland"), ("肾上腺",)),
    "lung_upper_lobe": (("upper lobe", "upper lung lobe", "upper lobe of lung"), ("肺上叶", "上叶")),
    "lung_middle_lobe": (("middle lobe", "middle lung lobe", "middle lobe of lung"), ("肺中叶", "中叶")),
    "lung_lower_lobe": (("lower lobe", "lower lung lobe", "lower lobe of lung"), ("肺下叶", "下叶")),
    "esophagus": (("esophagus", "oesophagus", "gullet"), ("食管", "食道")),
    "trachea": (("trachea", "windpipe"), ("气管",)),
    "thyroid_gland": (("thyroid gland", "thyroid"), ("甲状腺",)),
    "small_bowel": (("small bowel", "small intestine"), ("小肠",)),
    "duodenum": (("duodenum",), ("十二指肠",)),
    "colon": (("colon", "large bowel", "large intestine"), ("结肠", "大肠")),
    "urinary_bladder": (("urinary bladder", "bladder"), ("膀胱",)),
    "prostate": (("prostate", "prostate gland"), ("前列腺",)),
    "kidney_cyst": (("kidney cyst", "renal cyst", "kidney cysts", "renal cysts"), ("肾囊肿",)),
    "sacrum": (("sacrum",), ("骶骨",)),
    "heart": (("heart", "cardiac"), ("心脏",)),
    "aorta": (("aorta", "aortic"), ("主动脉",)),
    "pulmonary_vein": (("pulmonary vein", "pulmonary veins"), ("肺静脉",)),
    "brachiocephalic_trunk": (("brachiocephalic trunk", "brachiocephalic artery"), ("头臂干",)),
    "subclavian_artery": (("subclavian artery",), ("锁骨下动脉",)),
    "common_carotid_artery": (("common carotid artery", "carotid artery", "carotid"), ("颈总动脉",)),
    "brachiocephalic_vein": (("brachiocephalic vein",), ("头臂静脉",)),
    "atrial_appendage": (("atrial appendage", "auricular appendage"), ("心耳",)),
    "superior_vena_cava": (("superior vena cava", "svc"), ("上腔静脉",)),
    "inferior_vena_cava": (("inferior vena cava", "ivc"), ("下腔静脉",)),
    "portal_vein_and_splenic_vein": (
        ("portal vein and splenic vein", "portal vein", "splenic vein"),
        ("门静脉", "脾静脉"),
    ),
    "iliac_artery": (("common iliac artery", "iliac artery"), ("髂总动脉", "髂动脉")),
    "iliac_vena": (("common iliac vein", "iliac vein"), ("髂总静脉", "髂静脉")),
    "humerus": (("humerus",), ("肱骨",)),
    "scapula": (("scapula", "shoulder blade"), ("肩胛骨",)),
    "clavicula": (("clavicle", "clavicula", "collarbone", "collar bone"), ("锁骨",)),
    "femur": (("femur", "thigh bone", "thighbone"), ("股骨",)),
    "hip": (("hip bone", "hip", "pelvic bone", "os coxae"), ("髋骨",)),
    "spinal_cord": (("spinal cord",), ("脊髓",)),
    "gluteus_maximus": (("gluteus maximus",), ("臀大肌",)),
    "gluteus_medius": (("gluteus medius",), ("臀中肌",)),
    "gluteus_minimus": (("gluteus minimus",), ("臀小肌",)),
    "autochthon": (
        ("autochthonous back muscle", "autochthon", "erector spinae", "deep back muscle"),
        ("竖脊肌",),
    ),
    "iliopsoas": (("iliopsoas", "iliopsoas muscle"), ("髂腰肌",)),
    "brain": (("brain",), ("大脑", "脑")),
    "skull": (("skull", "cranium"), ("颅骨",)),
    "sternum": (("sternum", "breastbone"), ("胸骨",)),
    "costal_cartilages": (("costal cartilages", "costal cartilage"), ("肋软骨",)),
    "intervertebral_discs": (("intervertebral discs", "intervertebral disc", "discs"), ("椎间盘",)),
}

# Groups: one phrase for several classes, e.g. the lung as its lobes (CT) or as one class (MR).
# key: (English, Chinese, which base keys belong to it, Slicer-list type code of the whole or None)
GROUPS: Dict[str, Tuple[Tuple[str, ...], Tuple[str, ...], str, Optional[Tuple[str, str]]]] = {
    # SNOMED CT 39607008 "Lung": Slicer's General Anatomy list (as in MedMLLMSlicerLib.terminology)
    "lung": (("lung", "lungs", "pulmonary"), ("肺",), r"lung(_.*_lobe)?", ("39607008", "Lung")),
    "ribs": (("ribs", "rib", "rib cage"), ("肋骨",), r"rib_\d+", None),
    "vertebrae": (
        ("vertebrae", "vertebra", "spine", "vertebral column", "spinal column"),
        ("椎骨", "脊柱", "脊椎"),
        r"vertebrae(_[CTLS]\d+)?",
        None,
    ),
}

SIDES_EN = {"left": ("left",), "right": ("right",)}
SIDES_ZH = {"left": ("左侧", "左"), "right": ("右侧", "右")}

_ZH_DIGITS = "一二三四五六七八九十"
_REGIONS = {
    "C": ("cervical", "颈椎"),
    "T": ("thoracic", "胸椎"),
    "L": ("lumbar", "腰椎"),
    "S": ("sacral", "骶椎"),
}
_ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth")
_ORDINALS += ("seventh", "eighth", "ninth", "tenth", "eleventh", "twelfth")


def zh_number(n: int) -> str:
    """1..19 in Chinese numerals (一 .. 十九)."""
    if n <= 10:
        return _ZH_DIGITS[n - 1]
    return "十" + _ZH_DIGITS[n - 11]


def _ordinal_suffix(n: int) -> str:
    return "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")


def numbered_names(key: str) -> Tuple[Tuple[str, ...], Tuple[str, ...]]:
    """Phrases for `vertebrae_L1` ("L1", "L1 vertebra", "first lumbar vertebra", 第一腰椎) and
    `rib_3` ("3rd rib", "third rib", "rib 3", 第三肋); empty for other keys."""
    vertebra = re.fullmatch(r"vertebrae_([CTLS])(\d+)", key)
    if vertebra:
        region, n = vertebra.group(1), int(vertebra.group(2))
        word, zh = _REGIONS[region]
        code = f"{region.lower()}{n}"
        en = (f"{code} vertebra", f"{code} vertebral body", f"vertebra {code}", code)
        en += (f"{_ORDINALS[n - 1]} {word} vertebra", f"{n}{_ordinal_suffix(n)} {word} vertebra")
        return en, (f"第{zh_number(n)}{zh}", f"{code.upper()}椎体", f"{code.upper()}椎")
    rib = re.fullmatch(r"rib_(\d+)", key)
    if rib:
        n = int(rib.group(1))
        en = (f"{_ORDINALS[n - 1]} rib", f"{n}{_ordinal_suffix(n)} rib", f"rib {n}")
        return en, (f"第{zh_number(n)}肋骨", f"第{zh_number(n)}肋")
    return (), ()
