"""Stage cache_logits: teacher logits of every training sample, with a manifest, for distill."""

from bayeskd import cache, data, nets
from bayeskd.io import sha256_file
from bayeskd.train import predict
from common import CACHE, DATA, TEACHER, build, params, tensors


def main() -> None:
    p = params()
    ds = data.load(DATA, ("train",))
    model = nets.load_weights(build("teacher", p.teacher.net, ds), TEACHER)
    x, y = tensors(ds, "train")
    logits = predict(model, x).numpy()[:, None, :]  # one view per sample: the unaugmented input
    m = cache.write(logits, CACHE, dtype=p.cache.dtype, shard_size=p.cache.shard_size,
                    teacher_sha256=sha256_file(TEACHER), augmentation={"name": "identity", "views": 1})
    acc = (logits[:, 0].argmax(1) == y.numpy()).mean()
    print(f"cached {m['num_samples']} x {m['num_views']} views x {m['num_classes']} logits "
          f"({m['dtype']}, {len(m['shards'])} shards) -> {CACHE}; teacher train acc {acc:.4f}")


if __name__ == "__main__":
    main()
