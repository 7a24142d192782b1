"""HTTP ingress: a plain deployment that takes Starlette requests, a FastAPI app whose routes
are methods of the deployment, an app brought as it is, an app built in the replica, and a
model picked by a header. Run it: ``python examples/http_ingress.py``.

Every application with a ``route_prefix`` is served by the proxy on port 8000
(``SERVE_DEFAULT_HTTP_PORT`` changes it; the client below follows it).
"""

import os

import httpx

import serve

BASE = f"http://127.0.0.1:{os.environ.get('SERVE_DEFAULT_HTTP_PORT', '8000')}"

# --8<-- [start:plain]
from starlette.requests import Request
from starlette.responses import PlainTextResponse


@serve.deployment
class Calculator:
    async def __call__(self, request: Request):
        if request.method == "POST":
            numbers = await request.json()
            return {"sum": sum(numbers)}  # any other value is sent as JSON
        op = request.query_params.get("op", "add")
        if op != "add":
            return PlainTextResponse(f"no such operation: {op}\n", status_code=400)
        x, y = float(request.query_params["x"]), float(request.query_params["y"])
        return f"{x + y:g}"  # a str is sent as text/plain


serve.run(Calculator.bind(), name="calculator", route_prefix="/calc")
assert httpx.get(f"{BASE}/calc", params={"x": 2, "y": 3.5}).text == "5.5"
assert httpx.post(f"{BASE}/calc", json=[1, 2, 3]).json() == {"sum": 6}
assert httpx.get(f"{BASE}/calc", params={"op": "pow"}).status_code == 400
# --8<-- [end:plain]

# --8<-- [start:fastapi]
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

notes_api = FastAPI()


class Note(BaseModel):
    title: str
    body: str = ""


@serve.deployment
@serve.ingress(notes_api)
class Notes:
    def __init__(self) -> None:
        self.notes: dict[int, Note] = {}  # per replica: one replica here

    @notes_api.post("/notes")
    def add(self, note: Note) -> dict[str, int]:
        note_id = len(self.notes) + 1
        self.notes[note_id] = note
        return {"id": note_id}

    @notes_api.get("/notes/{note_id}")
    def get(self, note_id: int) -> Note:
        if note_id not in self.notes:
            raise HTTPException(status_code=404, detail=f"no note {note_id}")
        return self.notes[note_id]


serve.run(Notes.bind(), name="notes", route_prefix="/api")
created = httpx.post(f"{BASE}/api/notes", json={"title": "milk"}).json()
assert httpx.get(f"{BASE}/api/notes/{created['id']}").json() == {"title": "milk", "body": ""}
assert httpx.get(f"{BASE}/api/notes/99").status_code == 404
# --8<-- [end:fastapi]

# --8<-- [start:existing_app]
from serve.handle import DeploymentHandle

status_api = FastAPI()


@status_api.get("/version")
def version() -> dict[str, str]:
    return {"version": "1.4"}


@serve.deployment
class Clock:
    def now(self) -> str:
        return "12:00"


@serve.deployment
@serve.ingress(status_api)
class StatusPage:
    def __init__(self, clock: DeploymentHandle) -> None:
        self.clock = clock

    @status_api.get("/time")
    async def time(self) -> dict[str, str]:
        return {"time": await self.clock.now.remote()}  # a nested call to another deployment


serve.run(StatusPage.bind(Clock.bind()), name="status", route_prefix="/status")
assert httpx.get(f"{BASE}/status/version").json() == {"version": "1.4"}
assert httpx.get(f"{BASE}/status/time").json() == {"time": "12:00"}
# --8<-- [end:existing_app]

# --8<-- [start:builder]


def build_echo_app() -> FastAPI:
    """Runs in the replica: the app (and whatever it imports) is built there."""
    app = FastAPI()

    @app.get("/{word}")
    def echo(word: str) -> dict[str, str]:
        return {"echo": word, "pid": str(os.getpid())}

    return app


Echo = serve.deployment(serve.ingress(build_echo_app)())
serve.run(Echo.bind(), name="echo", route_prefix="/echo")
reply = httpx.get(f"{BASE}/echo/hello").json()
assert reply["echo"] == "hello"
assert reply["pid"] != str(os.getpid())  # built and run in the replica's process
# --8<-- [end:builder]

# --8<-- [start:model_header]


@serve.deployment
class Translator:
    @serve.multiplexed(max_num_models_per_replica=2)
    async def get_model(self, language: str) -> str:
        return {"fr": "bonjour", "de": "hallo"}[language]

    async def __call__(self, request: Request) -> str:
        return await self.get_model(serve.get_multiplexed_model_id())


serve.run(Translator.bind(), name="translate", route_prefix="/translate")
headers = {"serve_multiplexed_model_id": "de"}
assert httpx.get(f"{BASE}/translate", headers=headers).text == "hallo"
# --8<-- [end:model_header]

serve.shutdown()
print("http ingress example OK")
