"""``GET /``: a page for people who open the node's address (name, models, prices, links),
and ``GET /favicon.ico``.

Free routes: nothing here touches money. Prices are the ones ``/v1/models`` lists.
"""

from __future__ import annotations

from html import escape
from importlib import resources

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from nodeprov.errors import NodeprovError
from nodeprov.http.context import HttpContext, context
from nodeprov.http.info_routes import model_entry

FAVICON = (resources.files("nodeprov.http.admin") / "static" / "favicon.ico").read_bytes()
STYLE = """
body { margin: 0; font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif;
  color: #1d2330; background: #f5f6f8; }
header { background: #1d2330; color: #fff; padding: 18px 24px; }
header h1 { margin: 0; font-size: 22px; } header p { margin: 4px 0 0; color: #c9cedb; }
main { max-width: 960px; margin: 0 auto; padding: 12px 24px 40px; }
section { background: #fff; border: 1px solid #dde1e8; border-radius: 10px;
  padding: 14px 18px; margin: 14px 0; overflow-x: auto; }
h2 { font-size: 15px; color: #6b7385; margin: 0 0 8px; }
table { width: 100%; border-collapse: collapse; font-size: 14px; }
th, td { text-align: left; padding: 5px 8px; border-bottom: 1px solid #dde1e8; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
code { font-family: ui-monospace, Menlo, monospace; font-size: 13px; overflow-wrap: anywhere; }
a { color: #7a4bd8; }
dt { font-weight: 600; margin-top: 6px; } dd { margin: 0 0 4px; }
"""


def _sat(msat: int) -> str:
    sats, rest = divmod(msat, 1000)
    return f"{sats:,}.{rest:03d} sat"


def _api_base(ctx: HttpContext, request: Request) -> str:
    configured = ctx.config.node.http_url
    return (configured.rstrip("/") if configured else str(request.base_url).rstrip("/")) + "/v1"


def _models(ctx: HttpContext) -> str:
    rows = []
    for name in ctx.upstreams.models():
        entry = model_entry(ctx, name, ctx.upstreams.route(name).model)
        prices = entry.get("pricing_msat")
        if prices:
            cells = "".join(
                f'<td class="num">{_sat(prices.get(key, 0))}</td>'
                for key in ("request", "input_per_1m", "output_per_1m")
            )
        else:
            cells = '<td colspan="3">price unavailable right now</td>'
        rows.append(
            f"<tr><td><code>{escape(name)}</code></td>{cells}"
            f'<td class="num">{entry.get("context_length") or ""}</td></tr>'
        )
    if not rows:
        rows.append('<tr><td colspan="5">No models are offered right now.</td></tr>')
    return (
        '<table id="models"><thead><tr><th>Model</th><th class="num">Per request</th>'
        '<th class="num">Per 1M input tokens</th><th class="num">Per 1M output tokens</th>'
        '<th class="num">Context</th></tr></thead><tbody>' + "".join(rows) + "</tbody></table>"
    )


async def landing(request: Request) -> Response:
    """The node's name, description, models with prices, and where to go next."""
    ctx = context(request)
    node = ctx.config.node
    api = _api_base(ctx, request)
    links = [
        f'<dt>API base (OpenAI-compatible)</dt><dd><code id="api-base">{escape(api)}</code> · '
        '<a href="/v1/models">/v1/models</a> · <a href="/v1/info">/v1/info</a></dd>',
        '<dt>Operator</dt><dd><a href="/admin/" id="admin-link">/admin/</a> '
        '(dashboard, password login) · <a href="/health">/health</a></dd>',
    ]
    if ctx.npub:
        links.append(f'<dt>Nostr</dt><dd><code id="npub">{escape(ctx.npub)}</code></dd>')
    if node.onion_url:
        links.append(f"<dt>Onion</dt><dd><code>{escape(node.onion_url)}</code></dd>")
    mints = "".join(f"<li><code>{escape(m)}</code></li>" for m in ctx.mints)
    units = ", ".join(escape(u) for u in ctx.config.wallet.units)
    try:
        models = _models(ctx)
    except NodeprovError as exc:  # a broken price table must not take the page down
        models = f"<p>{escape(exc.message)}</p>"
    about = escape(node.description or "LLM access paid with Cashu eCash")
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(node.name)}</title><link rel="icon" href="/favicon.ico">
<style>{STYLE}</style></head>
<body><header><h1 id="node-name">{escape(node.name)}</h1>
<p>{about} · nodeprov {escape(ctx.version)}</p>
</header><main>
<section><h2>Models and prices (operator fee included; a request holds its maximum cost and
is charged what it used)</h2>{models}</section>
<section><h2>Links</h2><dl>{"".join(links)}</dl></section>
<section><h2>Pay with Cashu tokens from these mints ({units})</h2><ul>{mints}</ul>
<p>Send a token as <code>X-Cashu</code> with a request, or make an API key from one:
<code>POST {escape(api)}/wallet/create {{"cashu_token": "cashuB…"}}</code>.</p></section>
</main></body></html>
"""
    return HTMLResponse(page)


async def favicon(request: Request) -> Response:
    """The node's icon, cacheable for a day."""
    return Response(
        FAVICON, media_type="image/x-icon", headers={"Cache-Control": "public, max-age=86400"}
    )


ROUTES = [
    Route("/", landing, methods=["GET"]),
    Route("/favicon.ico", favicon, methods=["GET"]),
]
