"""Scores tables shared by the metrics and report tests (the arithmetic is in test_metrics.py)."""

from pathlib import Path

HEADER = "method,order,stage,modality,dataset,task,score"

HAND = f"""{HEADER}
expert,o,,image,MSCOCO,caption,100
expert,o,,image,VQA,qa,0.5
expert,o,,video,V,caption,50
expert,o,,audio,A,caption,10
M,o,1,image,MSCOCO,caption,80
M,o,1,image,VQA,qa,0.5
M,o,2,image,MSCOCO,caption,60
M,o,2,image,VQA,qa,0.3
M,o,2,video,V,caption,40
M,o,3,image,MSCOCO,caption,70
M,o,3,image,VQA,qa,0.4
M,o,3,video,V,caption,45
M,o,3,audio,A,caption,5
"""


def write(tmp_path: Path, text: str, name: str = "scores.csv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# The paper's Table 2, sequential column (METHOD.md section 5): method -> (mean, std) of backward RG, %.
PAPER_TABLE2 = {
    "Fine-Tuning": (59.76, 27.23),
    "Replay (1%)": (66.09, 25.86),
    "Replay (10%)": (77.52, 16.32),
    "EWC": (74.93, 17.14),
    "PathWeave": (86.85, 12.17),
    "MERA (1%)": (97.90, 6.02),
    "MERA (10%)": (101.00, 3.90),
}
