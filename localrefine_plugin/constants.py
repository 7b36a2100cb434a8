"""Constants shared by the Scipion side of localrefine (protocols, viewers, convert).

Nothing here imports Scipion, so the engine and the command line may use it too.
"""

from __future__ import annotations

#: Environment variable (and Scipion plugin variable) naming the ``localrefine``
#: program the protocols run; defaults to the launcher installed beside the Python
#: interpreter that has the plugin.
LOCALREFINE_PROGRAM_VAR = "LOCALREFINE_PROGRAM"

#: Project page shown in Scipion's protocol help.
URL = "https://github.com/localrefine/scipion-em-localrefine"

#: Scipion attribute that carries RELION's half-set label (1 or 2) on particles.
RANDOM_SUBSET_ATTR = "_rlnRandomSubset"

#: FSC threshold of the gold-standard resolution (Rosenthal and Henderson 2003).
FSC_THRESHOLD = 0.143

#: Fulcrum choices of the local refinement form, in the order the form lists them.
FULCRUM_MASK = 0
FULCRUM_BOX = 1
FULCRUM_CUSTOM = 2
FULCRUM_CHOICES = ["mask centre of mass", "box centre", "custom point (px)"]

#: Device choices of the local refinement form (``localrefine refine --device``).
DEVICE_CHOICES = ["auto", "cpu", "cuda"]

#: Columns of ``fsc.csv`` written by ``localrefine refine``.
FSC_CSV_COLUMNS = (
    "shell",
    "resolution_A",
    "fsc_unmasked",
    "fsc_masked",
    "fsc_corrected",
)

#: Labels of the three FSC objects the local refinement protocol outputs.
FSC_CHOICES_LABELS = ("unmasked", "masked", "corrected")
