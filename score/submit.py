"""What ``spark-submit`` runs: ``meli-score ... --engine spark`` (docs/cluster.md)::

    spark-submit --master yarn --files model.onnx "$(python -c 'import meli.score.submit as s; print(s.__file__)')" \\
        s3a://lake/catalog/ s3a://lake/scored/ --model model.onnx
"""

import sys

from meli.score.cli import main

if __name__ == "__main__":
    main(sys.argv[1:] + ["--engine", "spark"])
