#!/usr/bin/env python3
"""A standard gRPC client (Python's grpcio, stubs generated at test time from proto/dsv32.proto and
proto/health.proto with grpc_tools) against a real local cluster that dsv32ctl brings up: Generate
streams token ids and their text (equal to Detokenize of the ids), a same-seed request streams the
same tokens, bad input gets INVALID_ARGUMENT, grpc.health.v1.Health Check answers SERVING, Admin
needs the bearer token. The cluster is brought down at the end, whatever happens; exit 77 (skip)
without grpcio/grpc_tools.

usage: test_py_client.py DSV32CTL PROTO_DIR"""
import json
import os
import shutil
import subprocess
import sys
import tempfile

try:
    import grpc
    from grpc_tools import protoc
except ImportError as e:
    print(f"skipped: {e} (Debian: python3-grpcio python3-grpc-tools)")
    sys.exit(77)


def main():
    ctl, proto_dir = sys.argv[1], sys.argv[2]
    tmp = tempfile.mkdtemp(prefix="dsv32-py-")
    state = os.path.join(tmp, "state")
    try:
        # the stubs, generated into the temporary directory
        gen = os.path.join(tmp, "gen")
        os.mkdir(gen)
        rc = protoc.main(["grpc_tools.protoc", f"-I{proto_dir}", f"--python_out={gen}",
                          f"--grpc_python_out={gen}", os.path.join(proto_dir, "dsv32.proto"),
                          os.path.join(proto_dir, "health.proto")])
        assert rc == 0, f"protoc failed: {rc}"
        sys.path.insert(0, gen)
        import dsv32_pb2
        import dsv32_pb2_grpc
        import health_pb2
        import health_pb2_grpc

        # --watch-pid: killed at a timeout, this test still leaves nothing running
        up = subprocess.run([ctl, "cluster", "up", "--local", "--dir", state, "--json",
                             "--timeout", "120", "--watch-pid", str(os.getpid())],
                            capture_output=True, text=True, cwd=tmp)
        assert up.returncode == 0, f"cluster up failed:\n{up.stdout}\n{up.stderr}"
        info = json.loads(up.stdout)
        router = info["router"]
        assert router.startswith("127.0.0.1:"), router
        with open(os.path.join(state, "admin-token")) as f:
            token = f.read().strip()

        ch = grpc.insecure_channel(router)
        grpc.channel_ready_future(ch).result(timeout=30)
        gen_stub = dsv32_pb2_grpc.GenerateStub(ch)

        # Generate: a stream of token ids with their text
        def generate(text, n, seed):
            req = dsv32_pb2.GenerateRequest(
                text=text, sampling=dsv32_pb2.SamplingParams(max_tokens=n, seed=seed,
                                                             temperature=0.8, ignore_eos=True))
            ids, text_out, msgs, last = [], "", 0, None
            for m in gen_stub.Generate(req, timeout=120):
                msgs += 1
                ids += list(m.token_ids)
                text_out += m.text
                last = m
            return ids, text_out, msgs, last

        ids, text, msgs, last = generate("Hello from Python", 12, 7)
        assert len(ids) == 12, ids
        assert msgs >= 2, msgs  # streamed, not one message
        assert last.finish_reason == dsv32_pb2.FINISH_REASON_LENGTH, last
        assert last.usage.completion_tokens == 12 and last.usage.prompt_tokens > 0, last.usage
        detok = gen_stub.Detokenize(dsv32_pb2.DetokenizeRequest(token_ids=ids), timeout=30)
        assert detok.text == text, (detok.text, text)
        ids2, text2, _, _ = generate("Hello from Python", 12, 7)
        assert ids2 == ids and text2 == text, "same seed, different tokens"

        # bad input: a status with a reason
        try:
            list(gen_stub.Generate(dsv32_pb2.GenerateRequest(text=""), timeout=30))
            raise AssertionError("empty prompt accepted")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e

        info = gen_stub.GetModelInfo(dsv32_pb2.GetModelInfoRequest(), timeout=30)
        assert info.vocab_size == 129280, info

        # grpc.health.v1
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", "dsv32.v1.Generate"):
            r = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=30)
            assert r.status == health_pb2.HealthCheckResponse.SERVING, (service, r)

        # Admin: with the token, the nodes; without, UNAUTHENTICATED
        admin = dsv32_pb2_grpc.AdminStub(ch)
        nodes = admin.ListNodes(dsv32_pb2.ListNodesRequest(), timeout=30,
                                metadata=[("authorization", f"Bearer {token}")]).nodes
        assert sorted((n.kind, n.id) for n in nodes) == [("attn", "attn-0"),
                                                          ("router", "router-0")], nodes
        assert all(n.state == dsv32_pb2.NODE_STATE_READY for n in nodes), nodes
        try:
            admin.ListNodes(dsv32_pb2.ListNodesRequest(), timeout=30)
            raise AssertionError("Admin without a token answered")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.UNAUTHENTICATED, e
        ch.close()
        print("python grpcio client against the local cluster: OK")
    finally:
        down = subprocess.run([ctl, "cluster", "down", "--dir", state], capture_output=True,
                              text=True, cwd=tmp)
        if down.returncode != 0:
            print(down.stdout, down.stderr, file=sys.stderr)
        shutil.rmtree(tmp, ignore_errors=True)
        if down.returncode != 0:
            sys.exit(1)


if __name__ == "__main__":
    main()
