"""Stage check_params: the whole of params.yaml against the schema, before any other stage runs.

It depends on every key of params.yaml and the pipeline's first stage depends on its output, so on
bad parameters (an unknown key, a wrong type, a value outside its set) DVC stops here, before it
removes any other stage's outputs. Its outputs: the JSON Schema of params.yaml, which changes only
with the code, so a valid change of parameters reruns only the stages that read them; and the digest
of the parameter values it validated, which every stage run by DVC compares with params.yaml as it
finds it (bayeskd.runs), so a run whose params.yaml another run rewrote stops.
"""

import json
import sys

from bayeskd import config, runs
from bayeskd.io import OutputError, json_text, outputs

SCHEMA = "reports/params.schema.json"


def main() -> None:
    _, digest = config.load_digest_or_exit()
    try:
        with outputs() as out:
            out.text(SCHEMA, json.dumps(config.Params.model_json_schema(), indent=1) + "\n")
            out.text(config.VALIDATED_FILE, json_text({"params_sha256": digest}))
        runs.mark(digest)
    except OutputError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"params.yaml is valid; its schema -> {SCHEMA}, its digest -> {config.VALIDATED_FILE}")


if __name__ == "__main__":
    main()
