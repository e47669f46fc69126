import asyncio, threading, time, logging
import kopf

def test_kopf(k8s_api):
    k8s_api.register_custom_resource("kubetrain.dev", "v1alpha1", "trainingruns", kind="TrainingRun")
    registry = kopf.OperatorRegistry()
    seen = []
    @kopf.on.login(registry=registry)
    def login(**_):
        return kopf.ConnectionInfo(server=k8s_api.url, insecure=True)
    @kopf.on.create("kubetrain.dev", "v1alpha1", "trainingruns", registry=registry)
    def create(body, patch, **_):
        seen.append(body["metadata"]["name"])
        kopf.info(body, reason="Hello", message="created")
        patch.status["phase"] = "Pending"
    @kopf.timer("kubetrain.dev", "v1alpha1", "trainingruns", interval=0.5, registry=registry)
    def tick(body, patch, **_):
        seen.append(("tick", body.get("status", {}).get("phase")))
    settings = kopf.OperatorSettings()
    stop = threading.Event()
    def run():
        import traceback
        try:
          asyncio.run(kopf.operator(registry=registry, settings=settings, standalone=True, namespaces=["team-a"], stop_flag=stop))
        except BaseException: traceback.print_exc()
    t = threading.Thread(target=run); t0=time.time(); t.start()
    time.sleep(1)
    k8s_api.custom.create_namespaced_custom_object("kubetrain.dev", "v1alpha1", "team-a", "trainingruns", {"apiVersion": "kubetrain.dev/v1alpha1", "kind": "TrainingRun", "metadata": {"name": "r1"}, "spec": {"a": 1}})
    for _ in range(50):
        time.sleep(0.1)
        if len(seen) > 3: break
    obj = k8s_api.custom.get_namespaced_custom_object("kubetrain.dev", "v1alpha1", "team-a", "trainingruns", "r1")
    print(obj)
    print(seen)
    print([ (e.reason, e.message) for e in k8s_api.core.list_namespaced_event("team-a").items])
    t1=time.time(); stop.set(); t.join(20); print("stop took", time.time()-t1, t.is_alive())
