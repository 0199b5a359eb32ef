"""The datasets. Each is declared beside its maker with `bayeskd.declare.dataset`: its name, the
section of params.yaml it is made from (`data.<key>`, a pydantic class next to the maker), its class
count and whether its inputs are images:

    @dataset("gaussian", section=Gaussian, classes=lambda cfg: cfg.n_classes, images=False)
    def make_gaussian(cfg: Gaussian, seed: int) -> Dataset: ...

Every module of this package is imported and its declared datasets registered in `DATASETS`, so a
new dataset is a new module; the params schema (bayeskd.config) gets `data.name` and the sections
from here. The modules import no torch when imported (the schema must validate without it): heavy
imports go inside the makers.

Every maker returns a `base.Dataset` that keeps one contract (tests/test_datasets.py checks each
dataset it can make offline):
- inputs are float32 numpy arrays, labels int64 in 0..num_classes-1; `p`, where the Bayes class
  probability p*(y|x) is known, float64 rows summing to 1;
- image inputs are (channels, height, width) in [0, 1], on the uint8 grid k/255, with
  `info["uint8"] = True`: data.save stores them as uint8;
- images are not normalised: `info["normalize"]` (per-channel mean and std) goes to the model
  (bayeskd.nets.build(..., normalize=...)), so augmentation pads with black pixels, as the standard
  recipe does, and exported models take raw pixels;
- every input value lies in `value_range` (validation checks it).
"""

from bayeskd import declare

DATASETS: dict[str, declare.DatasetDecl] = declare.collect(__name__, __path__, declare.DatasetDecl)
