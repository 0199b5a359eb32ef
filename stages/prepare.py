"""Stage prepare: make the dataset, validate every split with Great Expectations, write data/prepared."""

from bayeskd import data
from bayeskd.validation import DataValidationError, validate
from common import DATA, fail, params, stage

REPORT = "reports/validation.json"


def main() -> None:
    p = params()
    try:
        ds = data.make(p.data)
    except data.DataError as e:
        fail(str(e))
    try:
        validate(ds, REPORT)
    except DataValidationError as e:
        fail(f"dataset {ds.name!r} failed validation (full results in {REPORT}):\n{e}")
    data.save(ds, DATA)
    sizes = ", ".join(f"{k} {len(s.y)}" for k, s in ds.splits.items())
    extra = f", Bayes accuracy {ds.info['bayes_accuracy']:.4f}" if "bayes_accuracy" in ds.info else ""
    print(f"prepared {ds.name}: {sizes}; {ds.num_classes} classes, input {ds.in_shape}{extra}")


if __name__ == "__main__":
    stage(main)
