"""Stage check_params: the whole of params.yaml against the schema, before any other stage runs.

It depends on every key of params.yaml and the pipeline's first stage depends on its output, so on
bad parameters (an unknown key, a wrong type, a value outside its set) DVC stops here, before it
removes any other stage's outputs. Its output is the JSON Schema of params.yaml, which changes only
with the code, so a valid change of parameters reruns only the stages that read them.
"""

import json

from bayeskd import config
from bayeskd.io import write_text

SCHEMA = "reports/params.schema.json"


def main() -> None:
    config.load_or_exit()
    write_text(SCHEMA, json.dumps(config.Params.model_json_schema(), indent=1) + "\n")
    print(f"params.yaml is valid; its schema -> {SCHEMA}")


if __name__ == "__main__":
    main()
