"""An OpenAI-compatible HTTP endpoint in front of the service pair (`hybrid serve openai`).

A third small process (Starlette on uvicorn) holding ONE `client.api.HybridClient` (one
pair of gRPC channels) for every request. Modules: `server` (app, routes, start-up),
`schemas` (request parsing and checks), `chat_template` (the checkpoint's Jinja template
or the default), `errors` (OpenAI error bodies, gRPC status -> HTTP status), `metrics`
(Prometheus). None of them imports torch: docs/openai.md.
"""
