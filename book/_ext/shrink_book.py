"""Small fixes to the Jupyter Book 1 HTML so that pages load without console errors (tests/book/browser_check.py).

* sphinx-thebe's inline configuration script (``const THEBE_JS_URL = ...``) is registered twice by the
  Jupyter Book / sphinx-book-theme stack, which throws "Identifier 'THEBE_JS_URL' has already been declared"
  on every page: each page keeps only the first copy of any script.
* pydata-sphinx-theme sets ``data-mode`` from ``localStorage`` or ``""`` and then logs "Got invalid theme
  mode" on a reader's first visit: an early inline script sets ``auto`` when nothing is stored.
"""

_MODE_JS = ("if (!document.documentElement.dataset.mode) { document.documentElement.dataset.mode = 'auto'; }")


def _dedup_scripts(app, pagename, templatename, context, doctree):
    files = context.get("script_files")
    if not files:
        return
    seen, out = set(), []
    for js in files:
        # the same inline script is registered once with filename None and once with "" (sphinx-thebe)
        key = (getattr(js, "filename", str(js)) or "", repr(sorted(getattr(js, "attributes", {}).items())))
        if key in seen:
            continue
        seen.add(key)
        out.append(js)
    files[:] = out


def setup(app):
    app.connect("html-page-context", _dedup_scripts, priority=100)
    app.add_js_file(None, body=_MODE_JS, priority=1)
    return {"parallel_read_safe": True, "parallel_write_safe": True}

