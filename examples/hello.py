"""The seed example: an Ingress deployment composing a Downstream one, run end to end.

Run it with ``python examples/hello.py`` (or ``make run``). Only the import differs from Ray
Serve: ``import serve`` instead of ``from ray import serve``.
"""

import serve
from serve.handle import DeploymentHandle, DeploymentResponse


@serve.deployment
class Downstream:
    def say_hi(self, message: str):
        return f"Hello {message}!"


@serve.deployment
class Ingress:
    def __init__(self, handle: DeploymentHandle):
        self._downstream_handle = handle

    async def __call__(self, name: str) -> str:
        response = self._downstream_handle.say_hi.remote(name)
        return await response


app = Ingress.bind(Downstream.bind())
handle: DeploymentHandle = serve.run(app)
response = handle.remote("world")
assert isinstance(response, DeploymentResponse)
assert response.result() == "Hello world!"
print(response.result())
for app_name, app_status in serve.status().applications.items():
    deployments = {name: dict(d.replica_states) for name, d in app_status.deployments.items()}
    print(f"application {app_name!r}: {app_status.status}, replicas {deployments}")
serve.shutdown()
