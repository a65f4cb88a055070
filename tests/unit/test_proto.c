/* Unit tests of the generated protobuf-c messages (proto/): etcd's and gRPC health's wire format
 * byte for byte (field numbers as upstream defines them, so real etcd and real health checkers
 * understand us), presence of the sampling fields whose zero is meaningful, descriptors of the
 * public, admin and cluster APIs. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdlib.h>
#include <string.h>

#include "cluster.pb-c.h"
#include "dsv32.pb-c.h"
#include "etcd.pb-c.h"
#include "health.pb-c.h"

static void expect_bytes(const ProtobufCMessage *m, const uint8_t *want, size_t n)
{
    size_t len = protobuf_c_message_get_packed_size(m);
    uint8_t *b = malloc(len + 1);
    assert_int_equal(protobuf_c_message_pack(m, b), len);
    assert_int_equal(len, n);
    assert_memory_equal(b, want, n);
    free(b);
}

static ProtobufCBinaryData bin(const char *s)
{
    return (ProtobufCBinaryData){.len = strlen(s), .data = (uint8_t *)s};
}

static void test_etcd_wire(void **state)
{
    /* RangeRequest{key=1 "a", range_end=2 "b", limit=3 5, keys_only=8 true} */
    Etcdserverpb__RangeRequest rr = ETCDSERVERPB__RANGE_REQUEST__INIT;
    rr.key = bin("a");
    rr.range_end = bin("b");
    rr.limit = 5;
    rr.keys_only = 1;
    const uint8_t rr_want[] = {0x0a, 1, 'a', 0x12, 1, 'b', 0x18, 5, 0x40, 1};
    expect_bytes(&rr.base, rr_want, sizeof(rr_want));

    /* PutRequest{key=1, value=2, lease=3} */
    Etcdserverpb__PutRequest pr = ETCDSERVERPB__PUT_REQUEST__INIT;
    pr.key = bin("k");
    pr.value = bin("v");
    pr.lease = 0x7f;
    const uint8_t pr_want[] = {0x0a, 1, 'k', 0x12, 1, 'v', 0x18, 0x7f};
    expect_bytes(&pr.base, pr_want, sizeof(pr_want));

    /* Compare{result=1 EQUAL(0), target=2 CREATE(1), key=3, create_revision=5 0, range_end=64}:
     * a oneof member is sent even when zero */
    Etcdserverpb__Compare c = ETCDSERVERPB__COMPARE__INIT;
    c.target = ETCDSERVERPB__COMPARE__COMPARE_TARGET__CREATE;
    c.key = bin("k");
    c.target_union_case = ETCDSERVERPB__COMPARE__TARGET_UNION_CREATE_REVISION;
    c.create_revision = 0;
    c.range_end = bin("z");
    const uint8_t c_want[] = {0x10, 1, 0x1a, 1, 'k', 0x28, 0, 0x82, 0x04, 1, 'z'};
    expect_bytes(&c.base, c_want, sizeof(c_want));

    /* WatchRequest{create_request=1 {key=1, range_end=2, start_revision=3 9, progress_notify=4}} */
    Etcdserverpb__WatchCreateRequest cr = ETCDSERVERPB__WATCH_CREATE_REQUEST__INIT;
    cr.key = bin("p");
    cr.range_end = bin("q");
    cr.start_revision = 9;
    cr.progress_notify = 1;
    Etcdserverpb__WatchRequest wr = ETCDSERVERPB__WATCH_REQUEST__INIT;
    wr.request_union_case = ETCDSERVERPB__WATCH_REQUEST__REQUEST_UNION_CREATE_REQUEST;
    wr.create_request = &cr;
    const uint8_t wr_want[] = {0x0a, 10, 0x0a, 1, 'p', 0x12, 1, 'q', 0x18, 9, 0x20, 1};
    expect_bytes(&wr.base, wr_want, sizeof(wr_want));

    /* WatchResponse: events is field 11, compact_revision 5, cancel_reason 6 */
    const uint8_t wresp[] = {0x10, 3,    0x28, 7,    0x32, 1,    'x', 0x5a, 9,    0x08, 1,
                             0x12, 5,    0x0a, 1,    'k',  0x18, 42};
    Etcdserverpb__WatchResponse *w =
        etcdserverpb__watch_response__unpack(NULL, sizeof(wresp), wresp);
    assert_non_null(w);
    assert_int_equal(w->watch_id, 3);
    assert_int_equal(w->compact_revision, 7);
    assert_string_equal(w->cancel_reason, "x");
    assert_int_equal(w->n_events, 1);
    assert_int_equal(w->events[0]->type, ETCDSERVERPB__EVENT__EVENT_TYPE__DELETE);
    assert_int_equal(w->events[0]->kv->key.len, 1);
    assert_int_equal(w->events[0]->kv->mod_revision, 42);
    etcdserverpb__watch_response__free_unpacked(w, NULL);

    /* LeaseKeepAliveResponse{header=1, ID=2, TTL=3}; LeaseTimeToLiveResponse grantedTTL=4 */
    const uint8_t ka[] = {0x0a, 2, 0x18, 100, 0x10, 0x05, 0x18, 0x06};
    Etcdserverpb__LeaseKeepAliveResponse *k =
        etcdserverpb__lease_keep_alive_response__unpack(NULL, sizeof(ka), ka);
    assert_non_null(k);
    assert_int_equal(k->header->revision, 100);
    assert_int_equal(k->id, 5);
    assert_int_equal(k->ttl, 6);
    etcdserverpb__lease_keep_alive_response__free_unpacked(k, NULL);
    const uint8_t ttl[] = {0x10, 1, 0x18, 0x7f, 0x20, 10, 0x2a, 1, 'k'};
    Etcdserverpb__LeaseTimeToLiveResponse *t =
        etcdserverpb__lease_time_to_live_response__unpack(NULL, sizeof(ttl), ttl);
    assert_non_null(t);
    assert_int_equal(t->ttl, 127);
    assert_int_equal(t->grantedttl, 10);
    assert_int_equal(t->n_keys, 1);
    etcdserverpb__lease_time_to_live_response__free_unpacked(t, NULL);

    /* the method paths follow from the package and service names */
    assert_string_equal(etcdserverpb__kv__descriptor.name, "etcdserverpb.KV");
    assert_string_equal(etcdserverpb__lease__descriptor.name, "etcdserverpb.Lease");
    assert_string_equal(etcdserverpb__watch__descriptor.name, "etcdserverpb.Watch");
}

static void test_health_wire(void **state)
{
    Grpc__Health__V1__HealthCheckRequest rq = GRPC__HEALTH__V1__HEALTH_CHECK_REQUEST__INIT;
    rq.service = "s";
    const uint8_t rq_want[] = {0x0a, 1, 's'};
    expect_bytes(&rq.base, rq_want, sizeof(rq_want));
    Grpc__Health__V1__HealthCheckResponse rs = GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__INIT;
    rs.status = GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVICE_UNKNOWN;
    const uint8_t rs_want[] = {0x08, 3};
    expect_bytes(&rs.base, rs_want, sizeof(rs_want));
    assert_string_equal(grpc__health__v1__health__descriptor.name, "grpc.health.v1.Health");
    assert_int_equal(grpc__health__v1__health__descriptor.n_methods, 2);
}

static void test_sampling_presence(void **state)
{
    Dsv32__V1__SamplingParams sp = DSV32__V1__SAMPLING_PARAMS__INIT;
    expect_bytes(&sp.base, NULL, 0); /* nothing set: nothing sent */
    /* temperature 0 (greedy) and seed 0 are values, distinct from unset */
    sp.temperature_opt_case = DSV32__V1__SAMPLING_PARAMS__TEMPERATURE_OPT_TEMPERATURE;
    sp.temperature = 0.0f;
    sp.seed_opt_case = DSV32__V1__SAMPLING_PARAMS__SEED_OPT_SEED;
    sp.seed = 0;
    const uint8_t want[] = {0x0d, 0, 0, 0, 0, 0x40, 0};
    expect_bytes(&sp.base, want, sizeof(want));
    Dsv32__V1__SamplingParams *back = dsv32__v1__sampling_params__unpack(NULL, sizeof(want), want);
    assert_non_null(back);
    assert_int_equal(back->temperature_opt_case,
                     DSV32__V1__SAMPLING_PARAMS__TEMPERATURE_OPT_TEMPERATURE);
    assert_int_equal(back->seed_opt_case, DSV32__V1__SAMPLING_PARAMS__SEED_OPT_SEED);
    assert_int_equal(back->logprobs_opt_case, DSV32__V1__SAMPLING_PARAMS__LOGPROBS_OPT__NOT_SET);
    dsv32__v1__sampling_params__free_unpacked(back, NULL);
}

static const ProtobufCFieldDescriptor *field(const ProtobufCMessageDescriptor *d,
                                             const char *name)
{
    const ProtobufCFieldDescriptor *f = protobuf_c_message_descriptor_get_field_by_name(d, name);
    assert_non_null(f);
    return f;
}

static void test_api_shape(void **state)
{
    /* public API */
    assert_string_equal(dsv32__v1__generate__descriptor.name, "dsv32.v1.Generate");
    const char *gen[] = {"Generate", "Tokenize", "Detokenize", "GetModelInfo"};
    for (int i = 0; i < 4; i++)
        assert_non_null(protobuf_c_service_descriptor_get_method_by_name(
            &dsv32__v1__generate__descriptor, gen[i]));
    const char *admin[] = {"ListNodes", "Drain", "Cordon", "Uncordon", "GetPlacement"};
    for (int i = 0; i < 5; i++)
        assert_non_null(protobuf_c_service_descriptor_get_method_by_name(
            &dsv32__v1__admin__descriptor, admin[i]));
    const ProtobufCMessageDescriptor *g = &dsv32__v1__generate_request__descriptor;
    assert_non_null(field(g, "text"));
    assert_non_null(field(g, "chat"));
    assert_non_null(field(g, "token_ids"));
    const ProtobufCMessageDescriptor *m = &dsv32__v1__chat_message__descriptor;
    const char *chat[] = {"role", "content", "reasoning_content", "tool_calls", "tool_call_id",
                          "name"};
    for (int i = 0; i < 6; i++)
        assert_non_null(field(m, chat[i]));
    const ProtobufCMessageDescriptor *s = &dsv32__v1__sampling_params__descriptor;
    const char *sampling[] = {"temperature", "top_p", "top_k", "min_p", "presence_penalty",
                              "frequency_penalty", "repetition_penalty", "seed", "stop",
                              "stop_token_ids", "max_tokens", "logprobs", "prompt_logprobs",
                              "ignore_eos"};
    for (int i = 0; i < 14; i++)
        assert_non_null(field(s, sampling[i]));
    assert_int_equal(dsv32__v1__finish_reason__descriptor.n_values, 6);

    /* cluster API: reuses the public sampling message, carries the resume state */
    assert_string_equal(dsv32__cluster__v1__attn__descriptor.name, "dsv32.cluster.v1.Attn");
    const ProtobufCFieldDescriptor *f =
        field(&dsv32__cluster__v1__run_request__descriptor, "sampling");
    assert_ptr_equal(f->descriptor, &dsv32__v1__sampling_params__descriptor);
    assert_int_equal(field(&dsv32__cluster__v1__run_request__descriptor, "resume_token_ids")->label,
                     PROTOBUF_C_LABEL_REPEATED);
    assert_non_null(field(&dsv32__cluster__v1__status_response__descriptor, "free_kv_blocks"));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_etcd_wire),
        cmocka_unit_test(test_health_wire),
        cmocka_unit_test(test_sampling_presence),
        cmocka_unit_test(test_api_shape),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
