"""The daemon's read-only status page (``/``) and its data (``/status.json``).

Both are rendered from one document (:meth:`imagesync.daemon.live.LiveStatus.document`), so
the page shows exactly what the JSON says: the names x sites matrix (each cell's state in
colour, its image id and version), the transfers in flight with their progress, each site's
health and last successful listing, the last pass and recent history.

Self-contained, for an air-gapped control host: one HTML response with its style and a few
lines of plain JavaScript inline, no framework, no external asset, no font or image to fetch.
The script refreshes the page's main part every :data:`REFRESH_SECONDS` (fetching ``/`` again
and swapping it in, so the scroll position stays) and says when the daemon stops answering;
without JavaScript a ``<noscript>`` meta refresh reloads the page.

Every value that comes from a site (names, ids, errors, owners) is escaped; on top of that the
Content-Security-Policy allows only this page's own inline style and script (by hash), so
markup that got through anyway could neither run a script nor load anything.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from html import escape
from typing import Any

from imagesync.daemon.live import LiveStatus
from imagesync.metrics import Page

#: seconds between two refreshes of the page
REFRESH_SECONDS = 5

#: the cell states, in the legend's order: (state, label, what it means)
STATES: tuple[tuple[str, str, str], ...] = (
    ("current", "current", "holds the newest version"),
    ("stale", "stale", "holds an older version"),
    ("missing", "missing", "holds no version"),
    ("in-flight", "in flight", "a copy is being written"),
    ("mismatch", "quarantined", "different bytes with the same version time: left alone"),
    ("not-copyable", "not copyable", "the newest version cannot be copied"),
    ("unreachable", "unreachable", "the site could not be listed"),
)
LABELS = {state: label for state, label, _ in STATES}

STYLE = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1b1f23;
background:#f6f8fa}
header{background:#24292f;color:#fff;padding:10px 20px;display:flex;gap:24px;align-items:baseline}
header h1{font-size:18px;margin:0}header .sub{color:#c9d1d9}
#conn.down{background:#b71c1c;color:#fff;padding:2px 8px;border-radius:3px}
main{padding:12px 20px}section{margin-bottom:22px}
h2{font-size:15px;margin:0 0 6px;border-bottom:1px solid #d0d7de;padding-bottom:3px}
table{border-collapse:collapse;background:#fff}
th,td{border:1px solid #d0d7de;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#eaeef2;font-weight:600}td.mono{white-space:nowrap}
td.cell{min-width:120px}.cell .st{font-weight:600}
.mono,.cell .id{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:12px}
.ver{font-size:12px;color:#444;font-weight:normal}
.s-current{background:#c8e6c9}.s-stale{background:#ffe082}.s-missing{background:#ffcdd2}
.s-in-flight{background:#bbdefb}.s-mismatch{background:#e1bee7}
.s-not-copyable{background:#d7ccc8}.s-unreachable{background:#cfd8dc;color:#37474f}
.notreq{opacity:.55;font-style:italic}
.legend span{display:inline-block;padding:2px 8px;margin:0 6px 4px 0;border-radius:3px;
border:1px solid #d0d7de}
.ok{color:#1b5e20;font-weight:600}.bad{color:#b71c1c;font-weight:600}
progress{width:180px;vertical-align:middle}
.muted{color:#57606a}
"""

# Fetch the page again and swap its <main> in; say since when the daemon does not answer.
SCRIPT = """
(function () {
  var every = REFRESH * 1000, since = null, n = 0, conn = document.getElementById("conn");
  function tick() {
    fetch(location.pathname, {cache: "no-store"}).then(function (r) {
      if (!r.ok) { throw new Error("HTTP " + r.status); }
      return r.text();
    }).then(function (text) {
      var next = new DOMParser().parseFromString(text, "text/html").getElementById("main");
      if (next) {
        next.dataset.refreshes = String(++n);
        document.getElementById("main").replaceWith(document.adoptNode(next));
      }
      since = null; conn.textContent = ""; conn.className = "";
    }).catch(function () {
      since = since || new Date();
      conn.textContent = "the daemon has not answered since " + since.toISOString();
      conn.className = "down";
    }).finally(function () { setTimeout(tick, every); });
  }
  setTimeout(tick, every);
})();
""".replace("REFRESH", str(REFRESH_SECONDS))


def _hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


#: only this page's own inline style and script; nothing else loads, nothing frames it
CSP = (
    f"default-src 'none'; style-src {_hash(STYLE)}; script-src {_hash(SCRIPT)}; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = (
    ("Cache-Control", "no-store"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
)


def e(value: object) -> str:
    """Escaped for HTML text and attribute values (quotes too)."""
    return escape("" if value is None else str(value), quote=True)


def human_size(n: int | None) -> str:
    if n is None:
        return "?"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"  # not reached


def short_time(iso: str | None) -> str:
    """``2024-05-01 10:00:00Z`` for the eye (``status.json`` keeps the full ISO time)."""
    if not iso:
        return ""
    day, _, clock = iso.partition("T")
    return f"{day} {clock.split('.')[0].rstrip('Z')}Z" if clock else iso


def short_id(image_id: object) -> str:
    """The part of an id that tells images apart: a Glance uuid's first 8 characters; a
    store's leaf (its ids are ``name/leaf``, the name already in the row, and leaves begin
    with the version's time, shown beside) by its end."""
    text = str(image_id)
    if "/" not in text:
        return text[:8]
    leaf = text.rsplit("/", 1)[-1]
    return leaf if len(leaf) <= 16 else "…" + leaf[-13:]


def _ref(ref: object) -> str:
    """``site:0123abcd`` from ``site:<full id>``."""
    site, _, image_id = str(ref).partition(":")
    return f"{site}:{short_id(image_id)}" if image_id else site


def _when(iso: str | None, now: datetime | None) -> str:
    """``2024-05-01 10:00:00Z (3m ago)``, escaped; ``never`` for None."""
    if not iso:
        return '<span class="muted">never</span>'
    ago = ""
    if now is not None:
        try:
            seconds = int((now - datetime.fromisoformat(iso)).total_seconds())
        except ValueError:
            seconds = -1
        if seconds >= 0:
            ago = f" ({_duration(seconds)} ago)"
    return f'<span class="mono" title="{e(iso)}">{e(short_time(iso))}</span>{e(ago)}'


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    if s < 172800:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d"


def _cell(name: str, site: str, cell: Mapping[str, Any], newest: Mapping[str, Any] | None) -> str:
    state = str(cell.get("state"))
    image_id = cell.get("image_id")
    version = cell.get("have") or (newest.get("version") if newest and state == "current" else None)
    classes = f"cell s-{e(state)}" + ("" if cell.get("required", True) else " notreq")
    parts = [f'<div class="st">{e(LABELS.get(state, state))}</div>']
    if image_id:
        parts.append(f'<div class="id" title="{e(image_id)}">{e(short_id(image_id))}</div>')
    if cell.get("converted_to"):  # the same version, in the format this cloud wants
        parts.append(f'<div class="ver">{e(cell["converted_to"])}, converted</div>')
    if cell.get("duplicates"):
        parts.append(f'<div class="ver">+{len(cell["duplicates"])} duplicate(s)</div>')
    if version:
        parts.append(f'<div class="ver" title="{e(version)}">{e(short_time(version))}</div>')
    if not cell.get("required", True):
        parts.append('<div class="ver">not required</div>')
    return (
        f'<td class="{classes}" data-name="{e(name)}" data-site="{e(site)}" '
        f'data-state="{e(state)}" data-image-id="{e(image_id or "")}">{"".join(parts)}</td>'
    )


def _matrix(doc: Mapping[str, Any]) -> str:
    sites = list(doc.get("sites", {}))
    images = doc.get("images", [])
    if not images:
        waiting = doc.get("as_of") is None
        text = "waiting for the first pass" if waiting else "no managed images found"
        return f'<p class="muted" id="no-images">{e(text)}</p>'
    head = "".join(
        f'<th data-site="{e(s)}">{e(s)}<br><span class="muted">{e(doc["sites"][s]["kind"])}'
        "</span></th>"
        for s in sites
    )
    rows = []
    for image in images:
        name = str(image["name"])
        newest = image.get("newest")
        first = f'<th class="name" data-name="{e(name)}">{e(name)}'
        if newest:
            first += f'<div class="ver">newest {e(short_time(newest["version"]))}</div>'
            first += f'<div class="ver mono">from {e(_ref(newest["origin"]))}</div>'
        if image.get("not_copyable"):
            first += f'<div class="bad">not copyable: {e(image["not_copyable"])}</div>'
        for ig in image.get("ignored", []):
            first += (
                f'<div class="ver">ignored: {e(ig["site"])}:{e(str(ig["image_id"])[:8])} '
                f"(owner {e(ig['owner'] or 'none')})</div>"
            )
        first += "</th>"
        cells = image.get("sites", {})
        row = "".join(
            _cell(name, s, cells[s], newest) if s in cells else f'<td data-site="{e(s)}"></td>'
            for s in sites
        )
        rows.append(_tr(first, row, name=name))
    legend = "".join(
        f'<span class="s-{e(state)}" title="{e(why)}">{e(label)}</span>'
        for state, label, why in STATES
    )
    return _table("matrix", "<th>name</th>" + head, rows) + f'<p class="legend">{legend}</p>'


def _th(*labels: str) -> str:
    return "".join(f"<th>{label}</th>" for label in labels)


def _td(html: str, cls: str | None = None) -> str:
    """One cell holding ``html``: markup the caller built, every outside value in it already
    escaped (a cell is often more than one value: a span, an arrow, a unit)."""
    return f'<td class="{cls}">{html}</td>' if cls else f"<td>{html}</td>"


def _tr(*cells: str, **data: object) -> str:
    """One row of ``cells``; each keyword a ``data-`` attribute (``name=x`` gives
    ``data-name="x"``, escaped), what the script and the tests find the row by."""
    attrs = "".join(f' data-{key}="{e(value)}"' for key, value in data.items())
    return f"<tr{attrs}>{''.join(cells)}</tr>"


def _id_span(image_id: object) -> str:
    """An image id cut short, the whole of it in the title."""
    return f'<span class="mono" title="{e(image_id)}">{e(short_id(image_id))}</span>'


def _table(table_id: str, head: str, rows: Iterable[str]) -> str:
    """One table of the page: its id (what the script and the tests find it by), head, rows."""
    return (
        f'<table id="{table_id}"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def _table_of(
    table_id: str,
    labels: tuple[str, ...],
    entries: Iterable[Mapping[str, Any]],
    row: Callable[[Mapping[str, Any]], str],
    empty: str,
) -> str:
    """A table of ``entries``, a ``row`` each under the heads ``labels``; ``empty`` (a line
    saying there is nothing) when there are none."""
    rows = [row(entry) for entry in entries]
    return _table(table_id, _th(*labels), rows) if rows else empty


def _flight_row(f: Mapping[str, Any]) -> str:
    size, done = f.get("size"), int(f.get("bytes") or 0)
    pct = min(100.0, 100.0 * done / size) if size else None
    # <progress>, not a div with a style attribute: the CSP allows no inline style
    bar = f'<progress max="100" value="{pct:.0f}"></progress> {pct:.0f}%' if pct is not None else ""
    return _tr(
        _td(e(f["name"])),
        _td(e(short_time(f["version"])), "mono"),
        _td(f"{e(f['source'])} → {e(', '.join(f['targets']))}"),
        _td(bar),
        _td(f"{e(human_size(done))} of {e(human_size(size))}"),
        _td(e(_duration(float(f.get("seconds") or 0)))),
        name=f["name"],
    )


def _in_flight(doc: Mapping[str, Any]) -> str:
    labels = ("name", "version", "from → to", "progress", "read", "running")
    empty = '<p class="muted" id="no-transfers">no transfer running</p>'
    return _table_of("in-flight", labels, doc.get("in_flight", []), _flight_row, empty)


def _quarantined_row(q: Mapping[str, Any]) -> str:
    hidden = " (hidden)" if q.get("hidden") else ""
    return _tr(
        _td(e(q["name"])),
        _td(f"{e(q['site'])}:{_id_span(q['image_id'])}{hidden}"),
        _td(e(short_time(q.get("version"))), "mono"),
        _td(e(q.get("reason")), "bad"),
        name=q["name"],
        site=q["site"],
    )


def _save_row(s: Mapping[str, Any]) -> str:
    outcome = e(s.get("state"))
    if s.get("image_id"):
        outcome += " " + e(s["image_id"])
    for part in ("saving", "error"):
        if s.get(part):
            outcome += ": " + e(s[part])
    return _tr(
        _td(e(s.get("cloud"))),
        _td(e(s.get("server_name"))),
        _td(e(s.get("name"))),
        _td(outcome, "bad" if s.get("error") else "ok"),
        server=s.get("server"),
    )


def _held(doc: Mapping[str, Any]) -> str:
    """The quarantined versions (a failed boot test) and what the last pass's save on
    shutdown found for each marked server."""
    labels = ("quarantined", "image", "version", "why")
    empty = '<p class="muted" id="no-quarantine">no version quarantined</p>'
    out = _table_of("quarantined", labels, doc.get("quarantined", []), _quarantined_row, empty)
    labels = ("cloud", "server", "save as", "last pass")
    empty = '<p class="muted" id="no-saves">no server marked for save on shutdown</p>'
    return out + _table_of("saves", labels, doc.get("saves", []), _save_row, empty)


def _sites(doc: Mapping[str, Any], now: datetime | None) -> str:
    rows = []
    for site, s in doc.get("sites", {}).items():
        if s.get("reachable") is None:
            health = '<span class="muted">not listed yet</span>'
        elif s["reachable"]:
            health = f'<span class="ok">reachable</span> ({e(s.get("images"))} listed)'
        else:
            health = f'<span class="bad">unreachable</span>: {e(s.get("error"))}'
        when = _when(s.get("last_listed"), now)
        rows.append(_tr(_td(e(site)), _td(e(s.get("kind"))), _td(health), _td(when), site=site))
    return _table("sites", _th("site", "kind", "health", "last successful listing"), rows)


def _coordination(doc: Mapping[str, Any]) -> str:
    """Several daemons: this member's health, every live member and how many names it
    drives, the uploads in flight in the group. Empty for a daemon alone."""
    c = doc.get("coordination")
    if not c:
        return ""
    ok = c.get("health") == "ok"
    health = (
        '<span class="ok">ok</span>'
        if ok
        else f'<span class="bad">{e(c.get("health"))}</span>: {e(c.get("health_detail"))}'
    )
    drives = c.get("drives") or {}
    total = sum(drives.values())
    me = c.get("member_id")
    members = [
        _tr(
            _td(e(m) + (" (this daemon)" if m == me else ""), "mono"),
            _td(f"{e(drives.get(m, 0))} of {e(total)} names"),
            member=m,
        )
        for m in c.get("members") or []
    ]
    labels = ("uploading", "to", "by member")
    empty = '<p class="muted" id="no-group-uploads">no upload in flight in the group</p>'
    uploads = _table_of("group-uploads", labels, c.get("uploads") or [], _upload_row, empty)
    return (
        "<section><h2>Coordination</h2>"
        f'<p id="coordination-health">{e(c.get("url"))} · this daemon {e(me)}: {health} · '
        f"last answer {e(c.get('last_ok_seconds_ago'))}s ago · {e(c.get('calls'))} calls</p>"
        f"{_table('members', _th('member', 'drives'), members)}{uploads}</section>"
    )


def _upload_row(u: Mapping[str, Any]) -> str:
    """Another member's (or this one's) upload in flight, as its lease in the group says."""
    return _tr(
        _td(e(u.get("name"))),
        _td(f"{e(u.get('site'))}:{_id_span(u.get('image_id'))}"),
        _td(e(u.get("member")), "mono"),
        site=u.get("site"),
    )


def _last_pass(doc: Mapping[str, Any], now: datetime | None) -> str:
    p = doc.get("last_pass")
    if not p:
        return '<p class="muted">no pass finished yet</p>'
    if p.get("error"):
        verdict = f'<span class="bad">failed</span>: {e(p["error"])}'
    else:
        verdict = '<span class="ok">ok</span>' if p.get("ok") else '<span class="bad">not ok</span>'
    return (
        f'<p id="last-pass">{verdict} · started {_when(p.get("started"), now)} · took '
        f"{e(p.get('seconds'))}s · {e(p.get('copied'))} copied, {e(p.get('failed'))} failed, "
        f"{e(p.get('retired'))} retired, {e(p.get('skipped'))} skipped</p>"
    )


def _history_row(r: Mapping[str, Any]) -> str:
    ok = r.get("result") == "ok"
    result = f'<span class="{"ok" if ok else "bad"}">{e(r.get("result"))}</span>'
    if r.get("error"):
        result += f" {e(r['error'])}"
    size = human_size(r["bytes"]) if r.get("bytes") is not None else ""
    secs = f"{r['seconds']:.1f}s" if isinstance(r.get("seconds"), int | float) else ""
    return _tr(
        _td(e(short_time(r.get("started"))), "mono"),
        _td(e(r.get("name"))),
        _td(f"{e(_ref(r.get('source')))} → {e(r.get('target'))}"),
        _td(result),
        _td(e(size)),
        _td(e(secs)),
    )


def _history(doc: Mapping[str, Any]) -> str:
    labels = ("started", "name", "from → to", "result", "size", "took")
    empty = '<p class="muted">no transfers recorded</p>'
    return _table_of("history", labels, doc.get("history", []), _history_row, empty)


def render(doc: Mapping[str, Any]) -> str:
    """The whole page for one status document."""
    generated = doc.get("generated")
    now = datetime.fromisoformat(generated) if generated else None
    unreachable = doc.get("unreachable") or {}
    summary = f"{len(doc.get('images', []))} names · {len(doc.get('sites', {}))} sites"
    if unreachable:
        summary += f" · unreachable: {', '.join(unreachable)}"
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        "<title>imagesync status</title>"
        f'<noscript><meta http-equiv="refresh" content="{REFRESH_SECONDS}"></noscript>'
        f"<style>{STYLE}</style></head><body>"
        f'<header><h1>imagesync</h1><span class="sub">status of this daemon</span>'
        f'<span id="conn"></span></header>'
        f'<main id="main" data-generated="{e(generated)}">'
        f'<p class="muted">{e(summary)} · as of {_when(doc.get("as_of"), now)} · '
        f"page of {e(short_time(generated))}, refreshed every {REFRESH_SECONDS}s · "
        '<a href="status.json">status.json</a> · <a href="metrics">metrics</a></p>'
        f"<section><h2>Images × sites</h2>{_matrix(doc)}</section>"
        f"<section><h2>Transfers in flight</h2>{_in_flight(doc)}</section>"
        f"<section><h2>Boot tests and saves</h2>{_held(doc)}</section>"
        f"<section><h2>Sites</h2>{_sites(doc, now)}</section>"
        f"{_coordination(doc)}"
        f"<section><h2>Last pass</h2>{_last_pass(doc, now)}</section>"
        f"<section><h2>Recent transfers</h2>{_history(doc)}</section>"
        f"</main><script>{SCRIPT}</script></body></html>\n"
    )


def pages(live: LiveStatus) -> dict[str, Callable[[], Page]]:
    """The listener's routes for the page and its data."""

    def page() -> Page:
        body = render(live.document()).encode()
        headers = (*HEADERS, ("Content-Security-Policy", CSP))
        return Page("text/html; charset=utf-8", body, headers)

    def data() -> Page:
        body = json.dumps(live.document(), indent=2).encode()
        return Page("application/json", body, HEADERS)

    return {"/": page, "/status.json": data}
