import json, sqlite3
from mitmproxy.test import taddons, tflow, tutils
from mitmproxy import http
from addon.gateway import Mcpmeter

async def test_proto(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"""
sqlite_path: {tmp_path/'m.db'}
seed:
  listings:
    - slug: echo-test
      upstream_url: http://127.0.0.1:1/mcp
      price_micro_cents: 1000
  consumers:
    - key: mcpm_test_abc123
      user_id: 1
      credit_micro_cents: 1000000
""")
    addon = Mcpmeter()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, mcpmeter_config=str(cfg))
        f = tflow.tflow()
        f.request.method = "POST"
        f.request.path = "/echo-test/sub?x=1"
        f.request.headers["Authorization"] = "Bearer mcpm_test_abc123"
        f.request.content = json.dumps({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{}}}).encode()
        print(f.live)
        await addon.request(f)
        print(f.request.url, f.request.headers, f.metadata, f.response)
        f.response = http.Response.make(200, json.dumps({"jsonrpc":"2.0","id":1,"result":{"content":[]}}).encode(), {"content-type":"application/json"})
        await addon.responseheaders(f)
        await addon.response(f)
        print(f.response.headers, f.comment, f.marked, f.metadata)
        print(repr(f.get_state())[:3000])
        addon.done()
