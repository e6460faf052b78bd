"""The 7 findings the paper's downstream classifier predicts (DiNO-Diffusion, Sec. 2.5), in paper order."""

LABELS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion", "Pneumonia", "Pneumothorax")
