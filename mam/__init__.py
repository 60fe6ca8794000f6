"""MAM: automated General Movements Assessment from infant video.

After Gao, Yao et al., Nat. Commun. 2023.

Decision support only, not a diagnosis. Data flows one way:
video -> pose -> features -> model -> result (see ``mam.screening``).
"""

__version__ = "0.1.0"

DISCLAIMER = (
    "Decision support only, not a diagnosis. This automated General Movements Assessment must be "
    "reviewed by a qualified GMA assessor together with the infant's clinical history."
)
