"""An application-level autoscaling policy: one decision for two deployments together.

Ray's ``autoscaling_policy`` on an application (in a config file) sees every autoscaled
deployment's ``AutoscalingContext`` at once: here the Model gets twice the Preprocessor's
replicas, the Preprocessor enough for the requests waiting on it. Deploy it with
``serve deploy examples/app_autoscaling.yaml`` (or ``serve run`` it); ``serve status`` shows
each decision. A Ray program would differ only in its imports.
"""

import math
from typing import Any

import serve
from serve.config import AutoscalingContext


def coordinated(contexts: dict[Any, AutoscalingContext]) -> tuple[dict[Any, int], dict[Any, Any]]:
    pre = next(d for d in contexts if d.name == "Preprocessor")
    model = next(d for d in contexts if d.name == "Model")
    ctx = contexts[pre]
    wanted = max(1, math.ceil(ctx.total_num_requests / 2))
    reason = {"reason": f"{ctx.total_num_requests:.1f} requests at the preprocessor"}
    return {pre: wanted, model: 2 * wanted}, {pre: reason, model: reason}


@serve.deployment
class Preprocessor:
    def __call__(self, text: str) -> str:
        return text.strip().lower()


@serve.deployment
class Model:
    def __call__(self, text: str) -> str:
        return f"label({text})"


@serve.deployment
class Pipeline:
    def __init__(self, preprocessor: Any, model: Any) -> None:
        self.preprocessor = preprocessor
        self.model = model

    async def __call__(self, text: str) -> str:
        label: str = await self.model.remote(await self.preprocessor.remote(text))
        return label


app = Pipeline.bind(Preprocessor.bind(), Model.bind())
