"""Export a BERT reaction-class classifier (rxnfp ``bert_ft_10k_25s``) to ONNX for red_onnx benchmarks.

A second real transformer beside the sentence encoder of ``export_text_encoder.py``, of another kind:
a small BERT with a sequence-classification head (pooler + linear), trained on a real task. The
weights come from PyPI, not from a model hub: the ``rxnfp`` wheel (version 0.1.0, MIT licence,
RXN4Chemistry team / University of Bern, 74.7 MB) ships three checkpoints under
``rxnfp/models/transformers/``. This script uses ``bert_ft_10k_25s``: a
``BertForSequenceClassification`` fine-tuned on the Schneider 50k reaction set (patent reactions
labelled with 50 NameRxn reaction classes, such as "Amide Schotten-Baumann" or "N-Boc deprotection";
Schwaller et al., Nature Machine Intelligence 3, 144-152, 2021). It reads a reaction SMILES
(``reactants.reagents>>product``) tokenised by a regular expression into atoms, bonds, rings and
brackets (vocabulary of 591), and answers one of the 50 classes. 12 layers, hidden width 256,
4 attention heads of 64, FFN 512, 6.7M parameters (27 MB fp32), post-LayerNorm, GELU.

This script

1. gets the wheel with ``pip download --no-deps`` (or takes it from ``--wheels DIR``) and unpacks the
   checkpoint into ``~/.cache/red-onnx/bench/rxn_classifier_src/bert_ft_10k_25s/``;
2. builds ``transformers.BertForSequenceClassification`` from it with ``local_files_only=True`` and
   eager attention (plain MatMul / Softmax in the graph);
3. exports it with ``torch.onnx.export(..., opset_version=17, dynamo=False)``: inputs ``input_ids`` and
   ``attention_mask`` (int64, [batch, sequence], both axes dynamic; the token types of a single-segment
   input are all zero, so the wrapper passes zeros and the graph has no third input), output ``logits``
   [batch, 50];
4. writes ``~/.cache/red-onnx/bench/rxn_classifier.onnx``, and beside it
   ``rxn_classifier_tokenizer/`` (``vocab.txt``, ``config.json``, ``labels.json`` with the 50 class
   codes and names in label order, ``source.json`` with the tokeniser's pattern);
5. composes a labelled reaction set offline (needs ``rdkit``: ``pip install rdkit``): 29 of the 50
   classes, each applied by an RDKit reaction template to hand-picked building blocks, written as
   canonical ``reactants.reagents>>product`` SMILES with the usual reagents (325 reactions, 7 to 12 a
   class; those longer than 128 tokens are left out); it is split (seeded) into 128 calibration and
   197 test reactions and tokenised at a fixed length (128, padded) into
   ``rxn_classifier_data/calibration.npz`` and ``test.npz`` (the model's input names), with
   ``reactions.json`` (SMILES, intended class, split) and the original model's answers
   (``predictions.json``: label, class and probability per reaction, and its accuracy against the
   intended classes: 0.978, so the set is in the model's domain);
6. checks onnxruntime against torch on real reactions (a padded batch, and batch 1 at another
   length): max abs diff of the logits and agreement of the arg-max labels.

Usage::

    python bench/models/export_rxn_classifier.py                  # download the wheel, export, check
    python bench/models/export_rxn_classifier.py --wheels wheels/  # wheel already downloaded there
    python bench/models/export_rxn_classifier.py --force          # re-export even if the file exists
    python bench/models/export_rxn_classifier.py --no-data        # export and check only (no rdkit)

Needs ``torch``, ``transformers``, ``onnx`` and ``onnxruntime``; the reaction set needs ``rdkit``.
About 20 s on 2 cores (the wheel download included).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

CACHE = Path(os.path.expanduser("~/.cache/red-onnx/bench"))
ONNX_PATH = CACHE / "rxn_classifier.onnx"
TOKENIZER_DIR = CACHE / "rxn_classifier_tokenizer"
SRC_DIR = CACHE / "rxn_classifier_src"
DATA_DIR = CACHE / "rxn_classifier_data"
PACKAGE = "rxnfp==0.1.0"
CHECKPOINT = "bert_ft_10k_25s"
CHECKPOINT_IN_WHEEL = f"rxnfp/models/transformers/{CHECKPOINT}/"
INPUTS = ("input_ids", "attention_mask")
SEQ = 128
N_CALIBRATION = 128
SEED = 0

# rxnfp's tokeniser (rxnfp/tokenization.py): a regular expression over SMILES, then the BERT vocabulary.
SMI_REGEX_PATTERN = (
    r"(\%\([0-9]{3}\)|\[[^\]]+]|Br?|Cl?|N|O|S|P|F|I|b|c|n|o|s|p|\||\(|\)|\.|=|#|-|\+|\\|\/|:|~|@|\?|>>?|\*"
    r"|\$|\%[0-9]{2}|[0-9])"
)

# The 50 classes of the Schneider set in label order: rxnfp numbers them by the sorted class code
# (the rxnfp project's rxnclass2id / rxnclass2name tables; the checkpoint itself names no class).
REACTION_CLASSES: tuple[tuple[str, str], ...] = (
    ("1.2.1", "Aldehyde reductive amination"),
    ("1.2.4", "Eschweiler-Clarke methylation"),
    ("1.2.5", "Ketone reductive amination"),
    ("1.3.6", "Bromo N-arylation"),
    ("1.3.7", "Chloro N-arylation"),
    ("1.3.8", "Fluoro N-arylation"),
    ("1.6.2", "Bromo N-alkylation"),
    ("1.6.4", "Chloro N-alkylation"),
    ("1.6.8", "Iodo N-alkylation"),
    ("1.7.4", "Hydroxy to methoxy"),
    ("1.7.6", "Methyl esterification"),
    ("1.7.7", "Mitsunobu aryl ether synthesis"),
    ("1.7.9", "Williamson ether synthesis"),
    ("1.8.5", "Thioether synthesis"),
    ("10.1.1", "Bromination"),
    ("10.1.2", "Chlorination"),
    ("10.1.5", "Wohl-Ziegler bromination"),
    ("10.2.1", "Nitration"),
    ("10.4.2", "Methylation"),
    ("2.1.1", "Amide Schotten-Baumann"),
    ("2.1.2", "Carboxylic acid + amine reaction"),
    ("2.1.7", "N-acetylation"),
    ("2.2.3", "Sulfonamide Schotten-Baumann"),
    ("2.3.1", "Isocyanate + amine reaction"),
    ("2.6.1", "Ester Schotten-Baumann"),
    ("2.6.3", "Fischer-Speier esterification"),
    ("2.7.2", "Sulfonic ester Schotten-Baumann"),
    ("3.1.1", "Bromo Suzuki coupling"),
    ("3.1.5", "Bromo Suzuki-type coupling"),
    ("3.1.6", "Chloro Suzuki-type coupling"),
    ("3.3.1", "Sonogashira coupling"),
    ("3.4.1", "Stille reaction"),
    ("5.1.1", "N-Boc protection"),
    ("6.1.1", "N-Boc deprotection"),
    ("6.1.3", "N-Cbz deprotection"),
    ("6.1.5", "N-Bn deprotection"),
    ("6.2.1", "CO2H-Et deprotection"),
    ("6.2.2", "CO2H-Me deprotection"),
    ("6.2.3", "CO2H-tBu deprotection"),
    ("6.3.1", "O-Bn deprotection"),
    ("6.3.7", "Methoxy to hydroxy"),
    ("7.1.1", "Nitro to amino"),
    ("7.2.1", "Amide to amine reduction"),
    ("7.3.1", "Nitrile reduction"),
    ("7.9.2", "Carboxylic acid to alcohol reduction"),
    ("8.1.4", "Alcohol to aldehyde oxidation"),
    ("8.1.5", "Alcohol to ketone oxidation"),
    ("8.2.1", "Sulfanyl to sulfinyl"),
    ("9.1.6", "Hydroxy to chloro"),
    ("9.3.1", "Carboxylic acid to acid chloride"),
)
CLASS_INDEX = {code: i for i, (code, _) in enumerate(REACTION_CLASSES)}

# ---------------------------------------------------------------------------------------------------
# Building blocks (SMILES) and reagents for the reaction set.
# ---------------------------------------------------------------------------------------------------


def _blocks(text: str) -> list[str]:
    """A list of building blocks written as SMILES separated by spaces."""
    return text.split()


AMINES_PRIMARY = _blocks(
    "NCc1ccccc1 Nc1ccccc1 Nc1ccc(F)cc1 NC1CC1 COCCN Nc1cccnc1 COc1ccc(CN)cc1 CC(C)CN NCCc1ccccc1"
    " NCc1ccncc1 NC1CCCCC1 Nc1cccc(Cl)c1 Nc1ccc2c(c1)OCO2 CC(N)c1ccccc1"
)
AMINES_SECONDARY = _blocks(
    "C1COCCN1 C1CCNCC1 CN1CCNCC1 C1CCNC1 c1ccc(C2CCNCC2)cc1 CNCc1ccccc1 CC(C)(C)OC(=O)N1CCNCC1"
    " c1ccc2c(c1)CCNC2 OC1CCNCC1 CNC1CCCCC1 O=C1CCNCC1 COC(=O)C1CCNCC1"
)
ACIDS = _blocks(
    "O=C(O)c1ccccc1 O=C(O)c1ccc(Cl)cc1 O=C(O)c1cccnc1 O=C(O)C1CC1 COc1cccc(C(=O)O)c1 O=C(O)c1cccs1"
    " O=C(O)c1ccc(C(F)(F)F)cc1 O=C(O)c1ccco1 O=C(O)Cc1ccccc1 CC(C)(C)OC(=O)NCC(=O)O O=C(O)c1ccccc1F"
    " O=C(O)c1ccncc1 O=C(O)c1cc2ccccc2[nH]1 Cc1ccc(C(=O)O)cc1 O=C(O)CCc1ccccc1 O=C(O)c1ccc2c(c1)OCO2"
)
ARYL_BROMIDES = _blocks(
    "COc1ccc(Br)cc1 Brc1cccnc1 N#Cc1ccc(Br)cc1 COC(=O)c1ccc(Br)cc1 Brc1cccs1 Brc1cncnc1 Fc1ccc(Br)cc1"
    " CC(=O)c1ccc(Br)cc1 Brc1ccc2ncccc2c1 Brc1ccc2[nH]ccc2c1 Cc1ccc(Br)cn1 O=Cc1ccc(Br)cc1"
    " Brc1ccc(C(F)(F)F)cc1"
)
ARYL_IODIDES = _blocks("COc1ccc(I)cc1 Ic1ccccc1 Ic1cccnc1 COC(=O)c1ccc(I)cc1 Cc1ccc(I)cc1 Ic1ccc(F)cc1")
BORONIC_ACIDS = _blocks(
    "OB(O)c1ccccc1 COc1ccc(B(O)O)cc1 OB(O)c1ccc(F)cc1 OB(O)c1cccnc1 Cc1ccc(B(O)O)cc1 OB(O)c1ccsc1"
    " OB(O)c1cccc(Cl)c1 O=Cc1ccc(B(O)O)cc1 OB(O)c1ccc2ccccc2c1"
)
HETARYL_CHLORIDES = _blocks(
    "Clc1ncccn1 Clc1ccncn1 O=[N+]([O-])c1ccc(Cl)nc1 Clc1ncnc2ccccc12 Clc1nc2ccccc2s1 Clc1ncnc2[nH]ccc12"
    " Clc1cnccn1 Clc1ccc2ccccc2n1 Cc1cc(Cl)nc(C)n1"
)
ACTIVATED_FLUORIDES = _blocks(
    "O=[N+]([O-])c1ccc(F)cc1 O=[N+]([O-])c1ccccc1F N#Cc1ccc(F)cc1 O=[N+]([O-])c1ccc(F)nc1"
    " CC(=O)c1ccc(F)cc1 O=[N+]([O-])c1cc(C(F)(F)F)ccc1F"
)
ALDEHYDES = _blocks(
    "O=Cc1ccccc1 O=Cc1ccc(Cl)cc1 O=Cc1cccnc1 CC(C)C=O O=CC1CCCCC1 COc1ccc(C=O)cc1 O=Cc1cccs1 O=Cc1ccco1"
    " O=Cc1ccncc1 O=Cc1ccc(F)cc1"
)
PHENOLS = _blocks(
    "Oc1ccccc1 Oc1ccc(Cl)cc1 COC(=O)c1ccc(O)cc1 Oc1cccnc1 N#Cc1ccc(O)cc1 Oc1ccc2ccccc2c1 Cc1ccc(O)cc1"
    " O=Cc1ccc(O)cc1 CC(=O)c1ccc(O)cc1 Oc1ccc(F)cc1"
)
ALKYL_BROMIDES = _blocks("BrCc1ccccc1 CCOC(=O)CBr CCCBr Fc1ccc(CBr)cc1 C=CCBr BrCC1CC1 COCCBr N#CCBr")
ALCOHOLS_FOR_MITSUNOBU = _blocks("OC1CCOCC1 CC(O)c1ccccc1 OCCN1CCOCC1 OC1CCCC1 CC(C)(C)OC(=O)N1CCC(O)CC1")
NH_HETEROARENES = _blocks(
    "c1cn[nH]c1 c1ccc2[nH]ccc2c1 c1ccc2[nH]cnc2c1 c1ccc2[nH]ncc2c1 O=[N+]([O-])c1cn[nH]c1"
    " Brc1ccc2[nH]ccc2c1 c1ccc2c(c1)[nH]c1ccccc12 Cc1cc(C)[nH]n1"
)
SULFONYL_CHLORIDES = _blocks(
    "Cc1ccc(S(=O)(=O)Cl)cc1 CS(=O)(=O)Cl O=S(=O)(Cl)c1ccccc1 O=S(=O)(Cl)c1ccc(F)cc1 O=S(=O)(Cl)c1cccs1"
    " CCS(=O)(=O)Cl"
)
ISOCYANATES = _blocks("O=C=Nc1ccccc1 O=C=Nc1ccc(Cl)cc1 CCN=C=O O=C=Nc1cccc(C(F)(F)F)c1 COc1ccc(N=C=O)cc1")
ALKYNES = _blocks("C#Cc1ccccc1 C#C[Si](C)(C)C C#CCO C#CCCCC C#Cc1cccnc1 C#CC1CC1")
NITROARENES = _blocks(
    "COc1ccc([N+](=O)[O-])cc1 COC(=O)c1ccc([N+](=O)[O-])cc1 Cc1ccc([N+](=O)[O-])cc1"
    " O=[N+]([O-])c1ccc(N2CCOCC2)cc1 O=[N+]([O-])c1cccnc1 O=[N+]([O-])c1ccc(Cl)cc1"
    " Cc1cc([N+](=O)[O-])ccc1N1CCCC1 O=[N+]([O-])c1ccc2[nH]ccc2c1 O=C(O)c1ccc([N+](=O)[O-])cc1"
    " CC(=O)Nc1ccc([N+](=O)[O-])cc1"
)
NITRILES = _blocks(
    "N#Cc1ccccc1 N#Cc1ccc(F)cc1 N#CCc1ccccc1 N#Cc1cccnc1 COc1ccc(C#N)cc1 N#CC1CCCCC1 N#Cc1ccc2c(c1)OCO2"
)
BENZYL_ALCOHOLS = _blocks(
    "OCc1ccccc1 OCc1ccc(Cl)cc1 OCc1cccnc1 COc1ccc(CO)cc1 OCc1cccs1 OCC1CCCCC1 OCc1ccc(Br)cc1 OCc1ccco1"
    " CC(C)(C)OC(=O)N1CCC(CO)CC1"
)
ANISOLES = _blocks(
    "COc1ccccc1 COc1ccc(Br)cc1 COc1ccc(C(=O)O)cc1 COc1cccc(C#N)c1 COc1ccc2ccccc2c1 COc1ccc(-c2ccccc2)cc1"
    " COc1ccc(C(C)=O)cc1 COc1ccc(Cl)cc1"
)

R = {
    "HATU": "CN(C)C(On1nnc2cccnc21)=[N+](C)C.F[P-](F)(F)(F)(F)F",
    "EDC": "CCN=C=NCCCN(C)C.Cl",
    "HOBt": "On1nnc2ccccc21",
    "DIPEA": "CCN(C(C)C)C(C)C",
    "TEA": "CCN(CC)CC",
    "DMF": "CN(C)C=O",
    "DCM": "ClCCl",
    "THF": "C1CCOC1",
    "MeOH": "CO",
    "EtOH": "CCO",
    "water": "O",
    "pyridine": "c1ccncc1",
    "dioxane": "C1COCCO1",
    "K2CO3": "O=C([O-])[O-].[K+].[K+]",
    "Cs2CO3": "O=C([O-])[O-].[Cs+].[Cs+]",
    "Na2CO3": "O=C([O-])[O-].[Na+].[Na+]",
    "NaH": "[H-].[Na+]",
    "STAB": "CC(=O)O[BH-](OC(C)=O)OC(C)=O.[Na+]",
    "NaBH3CN": "[BH3-]C#N.[Na+]",
    "AcOH": "CC(=O)O",
    "TFA": "O=C(O)C(F)(F)F",
    "HCl": "Cl",
    "LiOH": "[Li+].[OH-]",
    "NaOH": "[Na+].[OH-]",
    "Boc2O": "CC(C)(C)OC(=O)OC(=O)OC(C)(C)C",
    "Ac2O": "CC(=O)OC(C)=O",
    "PdPPh3": "[Pd].c1ccc(P(c2ccccc2)c2ccccc2)cc1",
    "PdCl2PPh3": "Cl[Pd]Cl.c1ccc(P(c2ccccc2)c2ccccc2)cc1",
    "CuI": "[Cu]I",
    "H2": "[H][H]",
    "PdC": "[Pd]",
    "Fe": "[Fe]",
    "NH4Cl": "[Cl-].[NH4+]",
    "RaNi": "[Ni]",
    "LiAlH4": "[Li+].[AlH4-]",
    "BH3": "B.C1CCOC1",
    "MnO2": "O=[Mn]=O",
    "DMP": "CC(=O)OI1(OC(C)=O)(OC(C)=O)OC(=O)c2ccccc21",
    "SOCl2": "O=S(Cl)Cl",
    "oxalyl": "O=C(Cl)C(=O)Cl",
    "BBr3": "BrB(Br)Br",
    "MeI": "CI",
    "DIAD": "CC(C)OC(=O)/N=N/C(=O)OC(C)C",
    "PPh3": "c1ccc(P(c2ccccc2)c2ccccc2)cc1",
    "toluene": "Cc1ccccc1",
    "MeCN": "CC#N",
    "DMSO": "CS(C)=O",
    "nBuOH": "CCCCO",
}

# Each class: (code, reaction SMARTS, reactant pools, extra molecules written as reactants, reagent
# choices). A reaction is the template applied to one building block from each pool; the extra
# molecules (a reagent that becomes part of the product, such as Boc2O) and one reagent set are
# written on the left of ">>".
AMINE_QUERY = "N;H2,H1;!$(N-[C,S]=[O,S,N]);!$(N-a:[n,o,s])"


def _nh(mapno: int) -> str:
    """SMARTS of a primary or secondary amine N (no amide, sulfonamide or amidine) with a map number."""
    return f"[{AMINE_QUERY}:{mapno}]"


TEMPLATES: list[tuple[str, str, list[list[str]], list[str], list[list[str]]]] = [
    (
        "2.1.2",
        f"[C:1](=[O:2])[OH1].{_nh(3)}>>[C:1](=[O:2])[N:3]",
        [ACIDS, AMINES_PRIMARY + AMINES_SECONDARY],
        [],
        [["HATU", "DIPEA", "DMF"], ["EDC", "HOBt", "DIPEA", "DCM"], ["EDC", "HOBt", "TEA", "DMF"]],
    ),
    (
        "2.1.1",
        f"[C:1](=[O:2])Cl.{_nh(3)}>>[C:1](=[O:2])[N:3]",
        [["acyl:" + a for a in ACIDS], AMINES_PRIMARY + AMINES_SECONDARY],
        [],
        [["TEA", "DCM"], ["DIPEA", "DCM"], ["pyridine", "DCM"], ["TEA", "THF"]],
    ),
    (
        "2.2.3",
        f"[S:1](=[O:2])(=[O:3])Cl.{_nh(4)}>>[S:1](=[O:2])(=[O:3])[N:4]",
        [SULFONYL_CHLORIDES, AMINES_PRIMARY + AMINES_SECONDARY],
        [],
        [["TEA", "DCM"], ["pyridine", "DCM"], ["pyridine"]],
    ),
    (
        "2.3.1",
        f"[N:1]=[C:2]=[O:3].{_nh(4)}>>[N:1][C:2](=[O:3])[N:4]",
        [ISOCYANATES, AMINES_PRIMARY + AMINES_SECONDARY],
        [],
        [["DCM"], ["THF"], ["TEA", "DCM"]],
    ),
    (
        "2.1.7",
        f"{_nh(1)}>>[N:1]C(C)=O",
        [AMINES_PRIMARY + AMINES_SECONDARY],
        ["Ac2O"],
        [["TEA", "DCM"], ["pyridine"], ["AcOH"]],
    ),
    (
        "5.1.1",
        f"{_nh(1)}>>[N:1]C(=O)OC(C)(C)C",
        [AMINES_PRIMARY + AMINES_SECONDARY],
        ["Boc2O"],
        [["TEA", "DCM"], ["TEA", "THF"], ["NaOH", "dioxane", "water"]],
    ),
    (
        "6.1.1",
        "[N:1]C(=O)OC(C)(C)C>>[N:1]",
        [["boc:" + a for a in AMINES_PRIMARY + AMINES_SECONDARY]],
        [],
        [["TFA", "DCM"], ["HCl", "dioxane"], ["HCl", "MeOH"]],
    ),
    (
        "1.2.1",
        f"[CH1:1](=O)[#6:2].{_nh(3)}>>[CH2:1]([#6:2])[N:3]",
        [ALDEHYDES, AMINES_PRIMARY + AMINES_SECONDARY],
        [],
        [["STAB", "DCM"], ["STAB", "AcOH", "DCM"], ["NaBH3CN", "AcOH", "MeOH"]],
    ),
    (
        "1.3.7",
        f"[c:1]Cl.{_nh(2)}>>[c:1][N:2]",
        [HETARYL_CHLORIDES, AMINES_PRIMARY + AMINES_SECONDARY],
        [],
        [["DIPEA", "nBuOH"], ["TEA", "EtOH"], ["K2CO3", "DMF"], ["DIPEA", "DMSO"]],
    ),
    (
        "1.3.8",
        f"[c:1]F.{_nh(2)}>>[c:1][N:2]",
        [ACTIVATED_FLUORIDES, AMINES_SECONDARY + AMINES_PRIMARY],
        [],
        [["K2CO3", "DMF"], ["DIPEA", "DMSO"], ["TEA", "MeCN"]],
    ),
    (
        "1.6.2",
        "[nH1:1].[CH2:2]Br>>[n:1][CH2:2]",
        [NH_HETEROARENES, ALKYL_BROMIDES],
        [],
        [["NaH", "DMF"], ["K2CO3", "DMF"], ["Cs2CO3", "MeCN"]],
    ),
    (
        "1.7.9",
        "[c:1][OH1:3].[CH2:2]Br>>[c:1][O:3][CH2:2]",
        [PHENOLS, ALKYL_BROMIDES],
        [],
        [["K2CO3", "DMF"], ["Cs2CO3", "MeCN"], ["K2CO3", "MeCN"]],
    ),
    (
        "1.7.7",
        "[c:1][OH1:3].[C;!$(C=O):2][OH1]>>[c:1][O:3][C:2]",
        [PHENOLS, ALCOHOLS_FOR_MITSUNOBU],
        [],
        [["DIAD", "PPh3", "THF"], ["DIAD", "PPh3", "toluene"]],
    ),
    (
        "1.7.4",
        "[c:1][OH1:2]>>[c:1][O:2]C",
        [PHENOLS],
        ["MeI"],
        [["K2CO3", "DMF"], ["NaH", "DMF"], ["K2CO3", "MeCN"]],
    ),
    (
        "1.7.6",
        "[C:1](=[O:2])[OH1:3]>>[C:1](=[O:2])[O:3]C",
        [ACIDS],
        ["MeI"],
        [["K2CO3", "DMF"], ["Cs2CO3", "DMF"]],
    ),
    (
        "3.1.1",
        "[c:1]Br.[c:2]B(O)O>>[c:1]-[c:2]",
        [ARYL_BROMIDES, BORONIC_ACIDS],
        [],
        [
            ["PdPPh3", "Na2CO3", "dioxane", "water"],
            ["PdPPh3", "K2CO3", "toluene", "EtOH", "water"],
            ["PdCl2PPh3", "Na2CO3", "DMF", "water"],
        ],
    ),
    (
        "3.1.6",
        "[c:1]Cl.[c:2]B(O)O>>[c:1]-[c:2]",
        [HETARYL_CHLORIDES, BORONIC_ACIDS],
        [],
        [["PdPPh3", "Na2CO3", "dioxane", "water"], ["PdCl2PPh3", "K2CO3", "dioxane", "water"]],
    ),
    (
        "3.3.1",
        "[c:1][I,Br].[CH1:2]#[C:3]>>[c:1][C:2]#[C:3]",
        [ARYL_IODIDES + ARYL_BROMIDES[:4], ALKYNES],
        [],
        [["PdCl2PPh3", "CuI", "TEA", "THF"], ["PdCl2PPh3", "CuI", "TEA", "DMF"], ["PdPPh3", "CuI", "TEA"]],
    ),
    (
        "7.1.1",
        "[c:1][N+](=O)[O-]>>[c:1]N",
        [NITROARENES],
        [],
        [["H2", "PdC", "MeOH"], ["H2", "PdC", "EtOH"], ["Fe", "NH4Cl", "EtOH", "water"]],
    ),
    (
        "7.3.1",
        "[C:1]#[N:2]>>[CH2:1][NH2:2]",
        [NITRILES],
        [],
        [["H2", "RaNi", "MeOH"], ["LiAlH4", "THF"], ["BH3"]],
    ),
    (
        "6.2.1",
        "[C:1](=[O:2])OCC>>[C:1](=[O:2])O",
        [["et:" + a for a in ACIDS]],
        [],
        [["LiOH", "THF", "water"], ["NaOH", "EtOH", "water"], ["LiOH", "MeOH", "water"]],
    ),
    (
        "6.2.2",
        "[C:1](=[O:2])O[CH3]>>[C:1](=[O:2])O",
        [["me:" + a for a in ACIDS]],
        [],
        [["LiOH", "THF", "water"], ["NaOH", "MeOH", "water"]],
    ),
    (
        "6.2.3",
        "[C:1](=[O:2])OC(C)(C)C>>[C:1](=[O:2])O",
        [["tbu:" + a for a in ACIDS if "OC(C)(C)C" not in a]],
        [],
        [["TFA", "DCM"], ["HCl", "dioxane"]],
    ),
    (
        "6.3.1",
        "[c:1]O[CH2]c1ccccc1>>[c:1]O",
        [["bn:" + p for p in PHENOLS]],
        [],
        [["H2", "PdC", "MeOH"], ["H2", "PdC", "EtOH"]],
    ),
    ("6.3.7", "[c:1]O[CH3]>>[c:1]O", [ANISOLES], [], [["BBr3", "DCM"]]),
    ("7.9.2", "[C:1](=O)[OH1]>>[CH2:1]O", [ACIDS], [], [["BH3"], ["LiAlH4", "THF"]]),
    ("8.1.4", "[CH2:1][OH1]>>[CH1:1]=O", [BENZYL_ALCOHOLS], [], [["MnO2", "DCM"], ["DMP", "DCM"]]),
    ("9.1.6", "[CH2:1][OH1]>>[CH2:1]Cl", [BENZYL_ALCOHOLS], [], [["SOCl2", "DCM"], ["SOCl2"]]),
    ("9.3.1", "[C:1](=[O:2])[OH1]>>[C:1](=[O:2])Cl", [ACIDS], [], [["SOCl2"], ["oxalyl", "DMF", "DCM"]]),
]
# Derived building blocks ("kind:SMILES"): protected or activated forms made from the pools above.
DERIVE = {
    "acyl": "[C:1](=[O:2])[OH1]>>[C:1](=[O:2])Cl",
    "boc": f"{_nh(1)}>>[N:1]C(=O)OC(C)(C)C",
    "et": "[C:1](=[O:2])[OH1]>>[C:1](=[O:2])OCC",
    "me": "[C:1](=[O:2])[OH1]>>[C:1](=[O:2])OC",
    "tbu": "[C:1](=[O:2])[OH1]>>[C:1](=[O:2])OC(C)(C)C",
    "bn": "[c:1][OH1:2]>>[c:1][O:2]Cc1ccccc1",
}


class SmilesTokenizer:
    """rxnfp's reaction tokeniser: SMILES regex tokens looked up in the BERT vocabulary.

    Args:
        vocab_file: ``vocab.txt`` of the checkpoint, one token a line.
    """

    def __init__(self, vocab_file: Path) -> None:
        tokens = vocab_file.read_text().splitlines()
        self.vocab = {tok: i for i, tok in enumerate(tokens)}
        self.regex = re.compile(SMI_REGEX_PATTERN)
        self.cls, self.sep = self.vocab["[CLS]"], self.vocab["[SEP]"]
        self.pad, self.unk = self.vocab["[PAD]"], self.vocab["[UNK]"]

    def ids(self, text: str) -> list[int]:
        """Token ids of one reaction, ``[CLS] ... [SEP]``, untruncated."""
        body = [self.vocab.get(tok, self.unk) for tok in self.regex.findall(text)]
        return [self.cls, *body, self.sep]

    def encode(self, texts: list[str], length: int | None = None) -> tuple[np.ndarray, np.ndarray, int]:
        """Pad (and truncate, keeping ``[SEP]`` last) a batch to ``length`` (default: the longest).

        Returns:
            ``input_ids`` and ``attention_mask`` (int64, [batch, length]) and how many were truncated.
        """
        seqs = [self.ids(t) for t in texts]
        n = length or max(len(s) for s in seqs)
        ids = np.full((len(seqs), n), self.pad, dtype=np.int64)
        mask = np.zeros((len(seqs), n), dtype=np.int64)
        cut = 0
        for i, s in enumerate(seqs):
            if len(s) > n:
                s = [*s[: n - 1], self.sep]
                cut += 1
            ids[i, : len(s)] = s
            mask[i, : len(s)] = 1
        return ids, mask, cut


def fetch_wheel(dest: Path) -> None:
    """``pip download --no-deps`` the rxnfp wheel into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary",
        ":all:",
        "-d",
        str(dest),
        PACKAGE,
    ]
    subprocess.run(cmd, check=True)


def unpack(wheels: Path, out: Path) -> Path:
    """Extract the ``bert_ft_10k_25s`` checkpoint (and the licence) from the wheel under ``wheels``."""
    found = sorted(glob.glob(str(wheels / "rxnfp-0.1.0-*.whl")))
    if not found:
        raise SystemExit(f"no rxnfp-0.1.0 wheel in {wheels}")
    model_dir = out / CHECKPOINT
    model_dir.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(found[0]) as zf:
        for name in zf.namelist():
            if name.startswith(CHECKPOINT_IN_WHEEL) and not name.endswith("/"):
                (model_dir / name[len(CHECKPOINT_IN_WHEEL) :]).write_bytes(zf.read(name))
            elif name.endswith(".dist-info/LICENSE") or name.endswith(".dist-info/METADATA"):
                (out / name.rsplit("/", 1)[1]).write_bytes(zf.read(name))
    if not (model_dir / "pytorch_model.bin").exists():
        raise SystemExit(f"no pytorch_model.bin under {model_dir}")
    return model_dir


def build_reactions(seed: int = SEED, per_class: int = 12) -> list[dict[str, Any]]:
    """Compose the labelled reaction set with RDKit templates (see the module docstring).

    Args:
        seed: seed of the choices of building blocks and reagents.
        per_class: reactions per class (fewer where a class has fewer distinct products).

    Returns:
        One dict per reaction: ``rxn`` (SMILES), ``code`` and ``name`` of the intended class, ``label``.
    """
    from rdkit import Chem, RDLogger
    from rdkit.Chem import AllChem

    RDLogger.DisableLog("rdApp.*")

    def canon(smi: str) -> str:
        mol = Chem.MolFromSmiles(smi)
        if mol is None:
            raise ValueError(f"bad SMILES {smi}")
        return Chem.MolToSmiles(mol)

    def run(smarts: str, mols: list[str]) -> str | None:
        """The single product of a template on ``mols`` (None when it does not apply or is ambiguous)."""
        rxn = AllChem.ReactionFromSmarts(smarts)
        parsed = [Chem.MolFromSmiles(m) for m in mols]
        for tmpl, mol in zip(rxn.GetReactants(), parsed, strict=True):
            if len(mol.GetSubstructMatches(tmpl)) != 1:
                return None
        products = set()
        for prods in rxn.RunReactants(tuple(parsed)):
            try:
                p = prods[0]
                Chem.SanitizeMol(p)
                products.add(Chem.MolToSmiles(p))
            except (ValueError, RuntimeError):
                continue
        return products.pop() if len(products) == 1 else None

    def material(spec: str) -> str | None:
        if ":" in spec.split("[")[0] and spec.split(":", 1)[0] in DERIVE:
            kind, smi = spec.split(":", 1)
            return run(DERIVE[kind], [smi])
        return canon(spec)

    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    for code, smarts, pools, extra, reagent_sets in TEMPLATES:
        combos: list[list[str]] = [[]]
        for pool in pools:
            combos = [[*c, m] for c in combos for m in pool]
        rng.shuffle(combos)
        seen: set[str] = set()
        for combo in combos:
            mats = [material(m) for m in combo]
            if any(m is None for m in mats):
                continue
            product = run(smarts, mats)  # type: ignore[arg-type]
            if product is None or product in seen:
                continue
            seen.add(product)
            reagents = [canon(R[r]) for r in rng.choice(reagent_sets)]
            left = [*mats, *(canon(R[e]) for e in extra), *reagents]
            out.append(
                {
                    "rxn": ".".join(left) + ">>" + product,
                    "code": code,
                    "name": dict(REACTION_CLASSES)[code],
                    "label": CLASS_INDEX[code],
                }
            )
            if len(seen) >= per_class:
                break
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--wheels", type=Path, help="folder holding the rxnfp-0.1.0 wheel (else pip download)")
    ap.add_argument("--out", type=Path, default=ONNX_PATH)
    ap.add_argument("--force", action="store_true", help="re-export even if --out exists")
    ap.add_argument("--no-data", action="store_true", help="skip the reaction set (needs rdkit)")
    args = ap.parse_args(argv)

    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    model_dir = SRC_DIR / CHECKPOINT
    if not (model_dir / "pytorch_model.bin").exists():
        if args.wheels is None:
            with tempfile.TemporaryDirectory() as tmp:
                fetch_wheel(Path(tmp))
                model_dir = unpack(Path(tmp), SRC_DIR)
        else:
            model_dir = unpack(args.wheels, SRC_DIR)

    tokenizer = SmilesTokenizer(model_dir / "vocab.txt")
    # The checkpoint's config says 50 labels but names two; name all 50 (code and class) instead.
    config_dict = json.loads((model_dir / "config.json").read_text())
    config_dict.pop("num_labels", None)
    config_dict["id2label"] = {i: f"{code} {name}" for i, (code, name) in enumerate(REACTION_CLASSES)}
    config_dict["label2id"] = {v: k for k, v in config_dict["id2label"].items()}
    model = BertForSequenceClassification.from_pretrained(
        str(model_dir),
        config=BertConfig(**config_dict),
        local_files_only=True,
        attn_implementation="eager",
    ).eval()
    cfg = model.config
    print(
        f"model: {cfg.model_type} layers={cfg.num_hidden_layers} hidden={cfg.hidden_size} "
        f"heads={cfg.num_attention_heads} ffn={cfg.intermediate_size} vocab={cfg.vocab_size} "
        f"labels={cfg.num_labels} params={sum(p.numel() for p in model.parameters()) / 1e6:.2f}M"
    )
    if cfg.num_labels != len(REACTION_CLASSES):
        raise SystemExit(f"expected {len(REACTION_CLASSES)} labels, the checkpoint has {cfg.num_labels}")

    class Wrapper(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            token_type_ids = torch.zeros_like(input_ids)
            out = self.inner(
                input_ids=input_ids,
                attention_mask=attention_mask,
                token_type_ids=token_type_ids,
                return_dict=True,
            )
            return out.logits

    wrapper = Wrapper(model).eval()
    if args.no_data:
        reactions = [{"rxn": r, "label": -1} for r in CHECK_REACTIONS]
    else:
        reactions = build_reactions()
        n_all = len(reactions)
        reactions = [r for r in reactions if len(tokenizer.ids(r["rxn"])) <= SEQ]
        counts: dict[str, int] = {}
        for r in reactions:
            counts[r["code"]] = counts.get(r["code"], 0) + 1
        print(
            f"reaction set: {len(reactions)} reactions in {len(counts)} classes "
            f"({n_all - len(reactions)} longer than {SEQ} tokens left out)"
        )
    rng = random.Random(SEED)
    check = [r["rxn"] for r in rng.sample(reactions, min(8, len(reactions)))]
    ids_t, mask_t, _ = tokenizer.encode(check)
    feeds_t = (torch.from_numpy(ids_t), torch.from_numpy(mask_t))

    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.force or not args.out.exists():
        dyn = {n: {0: "batch", 1: "sequence"} for n in INPUTS}
        dyn["logits"] = {0: "batch"}
        with torch.no_grad():
            torch.onnx.export(
                wrapper,
                feeds_t,
                str(args.out),
                input_names=list(INPUTS),
                output_names=["logits"],
                dynamic_axes=dyn,
                opset_version=17,
                dynamo=False,
                do_constant_folding=True,
            )
        print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB)")
    else:
        print(f"{args.out} exists (use --force to re-export)")

    TOKENIZER_DIR.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model_dir / "vocab.txt", TOKENIZER_DIR / "vocab.txt")
    shutil.copyfile(model_dir / "config.json", TOKENIZER_DIR / "config.json")
    labels = [{"label": i, "code": c, "name": n} for i, (c, n) in enumerate(REACTION_CLASSES)]
    (TOKENIZER_DIR / "labels.json").write_text(json.dumps(labels, indent=1))
    (TOKENIZER_DIR / "source.json").write_text(
        json.dumps(
            {
                "package": PACKAGE,
                "checkpoint": CHECKPOINT_IN_WHEEL,
                "model": "rxnfp BertForSequenceClassification, Schneider 50k reaction classes",
                "inputs": list(INPUTS),
                "output": "logits",
                "tokenizer": {
                    "regex": SMI_REGEX_PATTERN,
                    "cls": "[CLS]",
                    "sep": "[SEP]",
                    "pad": "[PAD]",
                    "unk": "[UNK]",
                },
            },
            indent=2,
        )
    )

    import onnxruntime as ort

    sess = ort.InferenceSession(str(args.out), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = wrapper(*feeds_t).numpy()
    got = sess.run(["logits"], {"input_ids": ids_t, "attention_mask": mask_t})[0]
    diff = float(np.abs(ref - got).max())
    same = float((ref.argmax(1) == got.argmax(1)).mean())
    print(f"check: padded batch {tuple(ids_t.shape)}: max abs diff {diff:.3g}, arg-max agreement {same:.3f}")
    ids1, mask1, _ = tokenizer.encode([min(check, key=len)])
    with torch.no_grad():
        ref1 = wrapper(torch.from_numpy(ids1), torch.from_numpy(mask1)).numpy()
    got1 = sess.run(["logits"], {"input_ids": ids1, "attention_mask": mask1})[0]
    diff1 = float(np.abs(ref1 - got1).max())
    print(f"check (batch 1, length {ids1.shape[1]}): max abs diff {diff1:.3g}")
    ok = diff < 1e-3 and diff1 < 1e-3 and same == 1.0

    if not args.no_data:
        write_data(reactions, tokenizer, sess)
    print("export check:", "OK" if ok else "MISMATCH")
    return 0 if ok else 1


def write_data(reactions: list[dict[str, Any]], tokenizer: SmilesTokenizer, sess: Any) -> None:
    """Split, tokenise and save the reaction set, with the original model's answers on it.

    Args:
        reactions: from :func:`build_reactions`.
        tokenizer: the checkpoint's tokeniser.
        sess: onnxruntime session of the exported model.
    """
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    order = list(range(len(reactions)))
    random.Random(SEED + 1).shuffle(order)
    split = {i: ("calibration" if k < N_CALIBRATION else "test") for k, i in enumerate(order)}
    for r_i, r in enumerate(reactions):
        r["split"] = split[r_i]
        r["tokens"] = len(tokenizer.ids(r["rxn"]))
    ids, mask, cut = tokenizer.encode([r["rxn"] for r in reactions], SEQ)
    logits = np.concatenate(
        [
            sess.run(["logits"], {"input_ids": ids[i : i + 32], "attention_mask": mask[i : i + 32]})[0]
            for i in range(0, len(reactions), 32)
        ]
    )
    prob = np.exp(logits - logits.max(1, keepdims=True))
    prob /= prob.sum(1, keepdims=True)
    pred = logits.argmax(1)
    for part in ("calibration", "test"):
        rows = [i for i in range(len(reactions)) if split[i] == part]
        np.savez(DATA_DIR / f"{part}.npz", input_ids=ids[rows], attention_mask=mask[rows])
    (DATA_DIR / "reactions.json").write_text(json.dumps(reactions, indent=1))
    labels = np.array([r["label"] for r in reactions])
    acc = {
        part: float((pred[m] == labels[m]).mean())
        for part, m in (
            ("all", np.ones(len(reactions), bool)),
            ("calibration", np.array([split[i] == "calibration" for i in range(len(reactions))])),
            ("test", np.array([split[i] == "test" for i in range(len(reactions))])),
        )
    }
    per_class: dict[str, list[int]] = {}
    for r, p in zip(reactions, pred, strict=True):
        hit = per_class.setdefault(r["code"], [0, 0])
        hit[0] += int(p == r["label"])
        hit[1] += 1
    predictions = {
        "sequence_length": SEQ,
        "truncated": cut,
        "accuracy_vs_intended_class": acc,
        "per_class_correct_of": per_class,
        "reactions": [
            {
                "split": r["split"],
                "label": int(p),
                "code": REACTION_CLASSES[int(p)][0],
                "probability": float(prob[i, p]),
                "intended": r["label"],
            }
            for i, (r, p) in enumerate(zip(reactions, pred, strict=True))
        ],
    }
    (DATA_DIR / "predictions.json").write_text(json.dumps(predictions, indent=1))
    lengths = [r["tokens"] for r in reactions]
    print(
        f"data: {sum(split[i] == 'calibration' for i in split)} calibration / "
        f"{sum(split[i] == 'test' for i in split)} test reactions at length {SEQ} "
        f"(tokens median {int(np.median(lengths))}, max {max(lengths)}, truncated {cut}) in {DATA_DIR}"
    )
    print(
        f"original model vs intended class: accuracy {acc['all']:.3f} (calibration {acc['calibration']:.3f}, "
        f"test {acc['test']:.3f}); mean top probability {float(prob.max(1).mean()):.3f}"
    )


# Reactions for the export check when the reaction set is skipped (rxnfp's README example and others).
CHECK_REACTIONS = [
    "Nc1cccc2cnccc12.O=C(O)c1cc([N+](=O)[O-])c(Sc2c(Cl)cncc2Cl)s1>>"
    "O=C(Nc1cccc2cnccc12)c1cc([N+](=O)[O-])c(Sc2c(Cl)cncc2Cl)s1",
    "CC(C)(C)OC(=O)N1CCC(Nc2ccccc2)CC1.O=C(O)C(F)(F)F.ClCCl>>c1ccc(NC2CCNCC2)cc1",
    "COc1ccc(Br)cc1.OB(O)c1ccccc1.O=C([O-])[O-].[Na+].[Na+].C1COCCO1>>COc1ccc(-c2ccccc2)cc1",
    "O=C(Cl)c1ccccc1.C1COCCN1.CCN(CC)CC.ClCCl>>O=C(c1ccccc1)N1CCOCC1",
]


if __name__ == "__main__":
    raise SystemExit(main())
