"""Stage cache_logits: teacher logits for every (training sample, view), with a manifest, for distill."""

from bayeskd import cache, data
from bayeskd.io import sha256_file
from bayeskd.validation import DataValidationError, validate_cache
from common import CACHE, DATA, TEACHER, augmentation, fail, load_teacher, params, stage, tensors

REPORT = "reports/cache_validation.json"


def main() -> None:
    p = params()
    ds = data.load(DATA, ("train",))
    model = load_teacher(p.teacher.net, ds)
    x, y = tensors(ds, "train")
    c = p.cache
    m = cache.build(model, x, y, CACHE, num_classes=ds.num_classes, augment=augmentation(p), views=c.views,
                    seed=p.seed, dtype=c.dtype, shard_size=c.shard_size, topk=c.topk,
                    teacher_sha256=sha256_file(TEACHER), batch_size=c.batch_size, device=p.compute.device)
    try:
        validate_cache(m, REPORT, c.min_accuracy)
    except DataValidationError as e:
        fail(f"the teacher-output cache failed validation (full results in {REPORT}):\n{e}")
    accuracy = sum(s["accuracy"] * (s["stop"] - s["start"]) for s in m["shards"]) / m["num_samples"]
    stored = m["dtype"] + (f", top-{m['topk']}" if m["topk"] else "")
    print(f"cached {m['num_samples']} samples x {m['num_slots']} views x {m['num_classes']} classes "
          f"({stored}, {len(m['shards'])} shards) -> {CACHE}; teacher accuracy on the views {accuracy:.4f}")


if __name__ == "__main__":
    stage(main)
