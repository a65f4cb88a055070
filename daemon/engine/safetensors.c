/* Safetensors reader (mmap, lazy shards, strict validation) and a small writer; see safetensors.h. */
#include "safetensors.h"

#include "error.h"

#include <cjson/cJSON.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define ST_MAX_HEADER_BYTES (256u << 20) /* the real 671B checkpoint's largest header is ~100 KB */
#define ST_MAX_FILES 4096

static _Thread_local char load_error[1024];

const char *dsv32_load_error(void) { return load_error; }

int dsv32_load_fail(int err, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(load_error, sizeof(load_error), fmt, ap);
    va_end(ap);
    return err;
}

/* ---- one file ---- */

struct dsv32_st_file {
    char *path;
    int fd;
    uint8_t *map;
    size_t map_bytes;
    int n;
    struct dsv32_st_tensor *t; /* (n) */
};

void dsv32_st_file_close(struct dsv32_st_file *f)
{
    if (!f)
        return;
    if (f->t)
        for (int i = 0; i < f->n; i++)
            free((char *)f->t[i].name);
    free(f->t);
    if (f->map && f->map != MAP_FAILED)
        munmap(f->map, f->map_bytes);
    if (f->fd >= 0)
        close(f->fd);
    free(f->path);
    free(f);
}

int dsv32_st_file_count(const struct dsv32_st_file *f) { return f->n; }
const struct dsv32_st_tensor *dsv32_st_file_tensor(const struct dsv32_st_file *f, int i)
{
    return &f->t[i];
}

static int parse_entry(struct dsv32_st_file *f, const cJSON *e, struct dsv32_st_tensor *t,
                       size_t data_bytes, const uint8_t *data)
{
    const char *name = e->string;
    const cJSON *dt = cJSON_GetObjectItemCaseSensitive(e, "dtype");
    const cJSON *shape = cJSON_GetObjectItemCaseSensitive(e, "shape");
    const cJSON *offs = cJSON_GetObjectItemCaseSensitive(e, "data_offsets");
    if (!cJSON_IsString(dt) || !cJSON_IsArray(shape) || !cJSON_IsArray(offs) ||
        cJSON_GetArraySize(offs) != 2)
        return dsv32_load_fail(DSV32_EFORMAT,
                               "%s: tensor '%s': header entry needs dtype, shape and data_offsets",
                               f->path, name);
    t->name = strdup(name);
    if (!t->name)
        return -ENOMEM;
    t->file = f->path;
    snprintf(t->dtype_name, sizeof(t->dtype_name), "%s", dt->valuestring);
    t->dtype = dsv32_dtype_parse(dt->valuestring);
    t->n_dims = cJSON_GetArraySize(shape);
    if (t->n_dims > DSV32_ST_MAX_DIMS)
        return dsv32_load_fail(DSV32_EFORMAT, "%s: tensor '%s': %d dimensions (at most %d)",
                               f->path, name, t->n_dims, DSV32_ST_MAX_DIMS);
    int64_t numel = 1;
    for (int d = 0; d < t->n_dims; d++) {
        const cJSON *s = cJSON_GetArrayItem(shape, d);
        if (!cJSON_IsNumber(s) || s->valuedouble < 0 || s->valuedouble > 1e15 ||
            s->valuedouble != (double)(int64_t)s->valuedouble)
            return dsv32_load_fail(DSV32_EFORMAT, "%s: tensor '%s': bad shape", f->path, name);
        t->shape[d] = (int64_t)s->valuedouble;
        if (t->shape[d] != 0 && numel > INT64_MAX / t->shape[d])
            return dsv32_load_fail(DSV32_EFORMAT, "%s: tensor '%s': shape overflows", f->path,
                                   name);
        numel *= t->shape[d];
    }
    t->numel = numel;
    double b = cJSON_GetArrayItem(offs, 0)->valuedouble, end = cJSON_GetArrayItem(offs, 1)->valuedouble;
    if (!cJSON_IsNumber(cJSON_GetArrayItem(offs, 0)) || !cJSON_IsNumber(cJSON_GetArrayItem(offs, 1)) ||
        b < 0 || end < b || b != (double)(uint64_t)b || end != (double)(uint64_t)end)
        return dsv32_load_fail(DSV32_EFORMAT, "%s: tensor '%s': bad data_offsets", f->path, name);
    if ((uint64_t)end > data_bytes)
        return dsv32_load_fail(DSV32_ETRUNC,
                               "%s: tensor '%s': data ends at byte %.0f but the file holds %zu "
                               "bytes of data (truncated file?)",
                               f->path, name, end, data_bytes);
    t->n_bytes = (size_t)(end - b);
    t->data = data + (size_t)b;
    size_t es = dsv32_dtype_size(t->dtype);
    if (t->dtype != DSV32_DT_UNKNOWN && (uint64_t)numel * es != t->n_bytes)
        return dsv32_load_fail(DSV32_EFORMAT,
                               "%s: tensor '%s': %zu bytes of data for %lld elements of %s",
                               f->path, name, t->n_bytes, (long long)numel, t->dtype_name);
    return 0;
}

int dsv32_st_file_open(const char *path, struct dsv32_st_file **ret)
{
    struct dsv32_st_file *f = calloc(1, sizeof(*f));
    cJSON *hdr = NULL;
    char *json = NULL;
    int r;
    if (!f)
        return -ENOMEM;
    f->fd = -1;
    f->path = strdup(path);
    if (!f->path) {
        r = -ENOMEM;
        goto fail;
    }
    f->fd = open(path, O_RDONLY | O_CLOEXEC);
    if (f->fd < 0) {
        r = dsv32_load_fail(-errno, "%s: cannot open: %s", path, strerror(errno));
        goto fail;
    }
    struct stat st;
    if (fstat(f->fd, &st) < 0) {
        r = dsv32_load_fail(-errno, "%s: cannot stat: %s", path, strerror(errno));
        goto fail;
    }
    if (!S_ISREG(st.st_mode)) {
        r = dsv32_load_fail(DSV32_EFORMAT, "%s: not a regular file", path);
        goto fail;
    }
    f->map_bytes = (size_t)st.st_size;
    if (f->map_bytes < 8) {
        r = dsv32_load_fail(DSV32_ETRUNC, "%s: %zu bytes, too short for a safetensors header",
                            path, f->map_bytes);
        goto fail;
    }
    f->map = mmap(NULL, f->map_bytes, PROT_READ, MAP_SHARED, f->fd, 0);
    if (f->map == MAP_FAILED) {
        r = dsv32_load_fail(-errno, "%s: mmap failed: %s", path, strerror(errno));
        goto fail;
    }
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--)
        hlen = (hlen << 8) | f->map[i];
    if (hlen > ST_MAX_HEADER_BYTES) {
        r = dsv32_load_fail(DSV32_EFORMAT, "%s: header length %llu is not plausible", path,
                            (unsigned long long)hlen);
        goto fail;
    }
    if (hlen > f->map_bytes - 8) {
        r = dsv32_load_fail(DSV32_ETRUNC, "%s: header of %llu bytes but the file has %zu (truncated)",
                            path, (unsigned long long)hlen, f->map_bytes);
        goto fail;
    }
    json = malloc(hlen + 1);
    if (!json) {
        r = -ENOMEM;
        goto fail;
    }
    memcpy(json, f->map + 8, hlen);
    json[hlen] = 0;
    hdr = cJSON_Parse(json);
    if (!cJSON_IsObject(hdr)) {
        r = dsv32_load_fail(DSV32_EFORMAT, "%s: header is not a JSON object", path);
        goto fail;
    }
    int n = 0;
    for (const cJSON *e = hdr->child; e; e = e->next)
        if (strcmp(e->string, "__metadata__") != 0)
            n++;
    f->t = calloc((size_t)(n ? n : 1), sizeof(*f->t));
    if (!f->t) {
        r = -ENOMEM;
        goto fail;
    }
    const uint8_t *data = f->map + 8 + hlen;
    size_t data_bytes = f->map_bytes - 8 - hlen;
    for (const cJSON *e = hdr->child; e; e = e->next) {
        if (strcmp(e->string, "__metadata__") == 0)
            continue;
        if (!cJSON_IsObject(e)) {
            r = dsv32_load_fail(DSV32_EFORMAT, "%s: header entry '%s' is not an object", path,
                                e->string);
            goto fail;
        }
        r = parse_entry(f, e, &f->t[f->n], data_bytes, data);
        f->n += f->t[f->n].name != NULL;
        if (r < 0)
            goto fail;
    }
    cJSON_Delete(hdr);
    free(json);
    *ret = f;
    return 0;
fail:
    cJSON_Delete(hdr);
    free(json);
    dsv32_st_file_close(f);
    return r;
}

/* ---- a checkpoint: name -> (shard, tensor) ---- */

struct ckpt_slot {
    char *name; /* NULL: empty */
    int file;   /* index into files */
    const struct dsv32_st_tensor *t; /* NULL until the shard is mapped */
};

struct dsv32_ckpt {
    char *dir;
    int n_files;
    char **file_paths;              /* (n_files) */
    struct dsv32_st_file **files;   /* (n_files) NULL until opened */
    size_t cap;                     /* power of two */
    size_t n_names;
    struct ckpt_slot *slots;        /* (cap) open addressing */
};

static uint64_t hash_str(const char *s)
{
    uint64_t h = 1469598103934665603ull;
    for (; *s; s++)
        h = (h ^ (uint8_t)*s) * 1099511628211ull;
    return h;
}

static struct ckpt_slot *slot_find(struct dsv32_ckpt *c, const char *name)
{
    for (size_t i = hash_str(name) & (c->cap - 1);; i = (i + 1) & (c->cap - 1))
        if (!c->slots[i].name || strcmp(c->slots[i].name, name) == 0)
            return &c->slots[i];
}

static int ckpt_grow(struct dsv32_ckpt *c)
{
    size_t old_cap = c->cap;
    struct ckpt_slot *old = c->slots;
    c->cap = old_cap ? old_cap * 2 : 1024;
    c->slots = calloc(c->cap, sizeof(*c->slots));
    if (!c->slots) {
        c->slots = old;
        c->cap = old_cap;
        return -ENOMEM;
    }
    for (size_t i = 0; i < old_cap; i++)
        if (old[i].name)
            *slot_find(c, old[i].name) = old[i];
    free(old);
    return 0;
}

static int ckpt_add_name(struct dsv32_ckpt *c, const char *name, int file,
                         const struct dsv32_st_tensor *t)
{
    if ((c->n_names + 1) * 2 > c->cap) {
        int r = ckpt_grow(c);
        if (r < 0)
            return r;
    }
    struct ckpt_slot *s = slot_find(c, name);
    if (s->name) {
        if (s->file != file)
            return dsv32_load_fail(DSV32_EFORMAT, "tensor '%s' appears in both %s and %s", name,
                                   c->file_paths[s->file], c->file_paths[file]);
        s->t = t;
        return 0;
    }
    s->name = strdup(name);
    if (!s->name)
        return -ENOMEM;
    s->file = file;
    s->t = t;
    c->n_names++;
    return 0;
}

static int ckpt_add_file(struct dsv32_ckpt *c, const char *path)
{
    if (c->n_files >= ST_MAX_FILES)
        return dsv32_load_fail(DSV32_EFORMAT, "%s: more than %d safetensors files", c->dir,
                               ST_MAX_FILES);
    char **p = realloc(c->file_paths, sizeof(*p) * (size_t)(c->n_files + 1));
    if (!p)
        return -ENOMEM;
    c->file_paths = p;
    struct dsv32_st_file **f = realloc(c->files, sizeof(*f) * (size_t)(c->n_files + 1));
    if (!f)
        return -ENOMEM;
    c->files = f;
    c->file_paths[c->n_files] = strdup(path);
    c->files[c->n_files] = NULL;
    if (!c->file_paths[c->n_files])
        return -ENOMEM;
    return c->n_files++;
}

static int ckpt_map_file(struct dsv32_ckpt *c, int i)
{
    if (c->files[i])
        return 0;
    struct dsv32_st_file *f;
    int r = dsv32_st_file_open(c->file_paths[i], &f);
    if (r < 0)
        return r;
    c->files[i] = f;
    for (int k = 0; k < f->n; k++) {
        r = ckpt_add_name(c, f->t[k].name, i, &f->t[k]);
        if (r < 0)
            return r;
    }
    return 0;
}

static int path_join(char *buf, size_t n, const char *dir, const char *file)
{
    if ((size_t)snprintf(buf, n, "%s/%s", dir, file) >= n)
        return dsv32_load_fail(-ENAMETOOLONG, "%s/%s: path too long", dir, file);
    return 0;
}

static int ckpt_load_index(struct dsv32_ckpt *c, const char *index_path)
{
    char *text = NULL;
    cJSON *doc = NULL;
    int r;
    FILE *fp = fopen(index_path, "rb");
    if (!fp)
        return dsv32_load_fail(-errno, "%s: cannot open: %s", index_path, strerror(errno));
    if (fseek(fp, 0, SEEK_END) < 0) {
        fclose(fp);
        return dsv32_load_fail(-EIO, "%s: cannot seek", index_path);
    }
    long len = ftell(fp);
    rewind(fp);
    if (len < 0 || len > (64l << 20)) {
        fclose(fp);
        return dsv32_load_fail(DSV32_EFORMAT, "%s: implausible size", index_path);
    }
    text = malloc((size_t)len + 1);
    if (!text || fread(text, 1, (size_t)len, fp) != (size_t)len) {
        fclose(fp);
        free(text);
        return dsv32_load_fail(-EIO, "%s: read failed", index_path);
    }
    fclose(fp);
    text[len] = 0;
    doc = cJSON_Parse(text);
    const cJSON *map = cJSON_GetObjectItemCaseSensitive(doc, "weight_map");
    if (!cJSON_IsObject(map)) {
        r = dsv32_load_fail(DSV32_EFORMAT, "%s: no \"weight_map\" object", index_path);
        goto out;
    }
    for (const cJSON *e = map->child; e; e = e->next) {
        if (!cJSON_IsString(e) || strchr(e->valuestring, '/')) {
            r = dsv32_load_fail(DSV32_EFORMAT, "%s: weight_map entry '%s' is not a file name",
                                index_path, e->string);
            goto out;
        }
        int fi = -1;
        for (int k = 0; k < c->n_files; k++) {
            const char *base = strrchr(c->file_paths[k], '/') + 1;
            if (strcmp(base, e->valuestring) == 0) {
                fi = k;
                break;
            }
        }
        if (fi < 0) {
            char path[PATH_MAX];
            if ((r = path_join(path, sizeof(path), c->dir, e->valuestring)) < 0)
                goto out;
            if ((r = fi = ckpt_add_file(c, path)) < 0)
                goto out;
        }
        if ((r = ckpt_add_name(c, e->string, fi, NULL)) < 0)
            goto out;
    }
    r = 0;
out:
    cJSON_Delete(doc);
    free(text);
    return r;
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

int dsv32_ckpt_open(const char *path, struct dsv32_ckpt **ret)
{
    struct dsv32_ckpt *c = calloc(1, sizeof(*c));
    int r;
    if (!c)
        return -ENOMEM;
    struct stat st;
    if (stat(path, &st) < 0) {
        r = dsv32_load_fail(-errno, "%s: %s", path, strerror(errno));
        goto fail;
    }
    if ((r = ckpt_grow(c)) < 0)
        goto fail;
    if (S_ISREG(st.st_mode)) {
        char *slash = strrchr(path, '/');
        c->dir = slash ? strndup(path, (size_t)(slash - path)) : strdup(".");
        if ((r = ckpt_add_file(c, path)) < 0 || (r = ckpt_map_file(c, 0)) < 0)
            goto fail;
        *ret = c;
        return 0;
    }
    c->dir = strdup(path);
    if (!c->dir) {
        r = -ENOMEM;
        goto fail;
    }
    char index[PATH_MAX];
    if ((r = path_join(index, sizeof(index), path, "model.safetensors.index.json")) < 0)
        goto fail;
    if (access(index, F_OK) == 0) {
        if ((r = ckpt_load_index(c, index)) < 0)
            goto fail;
    } else {
        DIR *d = opendir(path);
        if (!d) {
            r = dsv32_load_fail(-errno, "%s: %s", path, strerror(errno));
            goto fail;
        }
        char **names = NULL;
        int n = 0;
        struct dirent *de;
        while ((de = readdir(d))) {
            size_t l = strlen(de->d_name);
            if (l > 12 && strcmp(de->d_name + l - 12, ".safetensors") == 0) {
                char **nn = realloc(names, sizeof(*names) * (size_t)(n + 1));
                if (!nn)
                    break;
                names = nn;
                names[n++] = strdup(de->d_name);
            }
        }
        closedir(d);
        qsort(names, (size_t)n, sizeof(*names), cmp_str);
        r = 0;
        for (int i = 0; i < n; i++) {
            char p[PATH_MAX];
            if (r >= 0 && (r = path_join(p, sizeof(p), path, names[i])) >= 0 &&
                (r = ckpt_add_file(c, p)) >= 0)
                r = ckpt_map_file(c, r);
            free(names[i]);
        }
        free(names);
        if (r < 0)
            goto fail;
        if (n == 0) {
            r = dsv32_load_fail(DSV32_EMISSING, "%s: no *.safetensors file and no "
                                "model.safetensors.index.json", path);
            goto fail;
        }
    }
    *ret = c;
    return 0;
fail:
    dsv32_ckpt_close(c);
    return r;
}

void dsv32_ckpt_close(struct dsv32_ckpt *c)
{
    if (!c)
        return;
    for (size_t i = 0; i < c->cap; i++)
        free(c->slots[i].name);
    free(c->slots);
    for (int i = 0; i < c->n_files; i++) {
        dsv32_st_file_close(c->files[i]);
        free(c->file_paths[i]);
    }
    free(c->files);
    free(c->file_paths);
    free(c->dir);
    free(c);
}

int dsv32_ckpt_has(struct dsv32_ckpt *c, const char *name) { return slot_find(c, name)->name != NULL; }

int dsv32_ckpt_get(struct dsv32_ckpt *c, const char *name, const struct dsv32_st_tensor **ret)
{
    struct ckpt_slot *s = slot_find(c, name);
    if (!s->name)
        return dsv32_load_fail(DSV32_EMISSING, "%s: tensor '%s' is missing from the checkpoint",
                               c->dir, name);
    if (!s->t) {
        int file = s->file, r = ckpt_map_file(c, file);
        if (r < 0)
            return r;
        s = slot_find(c, name); /* the table may have grown */
        if (!s->t)
            return dsv32_load_fail(DSV32_EMISSING,
                                   "%s: the index puts tensor '%s' in %s, but that file lacks it",
                                   c->dir, name, c->file_paths[file]);
    }
    *ret = s->t;
    return 0;
}

int dsv32_ckpt_n_mapped(const struct dsv32_ckpt *c)
{
    int n = 0;
    for (int i = 0; i < c->n_files; i++)
        n += c->files[i] != NULL;
    return n;
}

/* ---- writer ---- */

static int copy_fill(void *ctx, int i, size_t offset, void *buf, size_t bytes)
{
    const struct dsv32_st_entry *e = ctx;
    memcpy(buf, (const uint8_t *)e[i].data + offset, bytes);
    return 0;
}

int dsv32_st_write(const char *path, const struct dsv32_st_entry *e, int n)
{
    return dsv32_st_write_stream(path, e, n, 1 << 20, copy_fill, (void *)e);
}

static uint64_t entry_bytes(const struct dsv32_st_entry *e)
{
    uint64_t numel = 1;
    for (int d = 0; d < e->n_dims; d++)
        numel *= (uint64_t)e->shape[d];
    return numel * dsv32_dtype_size(e->dtype);
}

int dsv32_st_write_stream(const char *path, const struct dsv32_st_entry *e, int n, size_t chunk,
                          int (*fill)(void *ctx, int i, size_t offset, void *buf, size_t bytes),
                          void *ctx)
{
    cJSON *hdr = cJSON_CreateObject();
    char *json = NULL;
    uint8_t *buf = NULL;
    FILE *fp = NULL;
    int r = -ENOMEM;
    if (!hdr)
        return -ENOMEM;
    cJSON *meta = cJSON_AddObjectToObject(hdr, "__metadata__");
    if (!meta || !cJSON_AddStringToObject(meta, "format", "pt"))
        goto out;
    uint64_t off = 0;
    for (int i = 0; i < n; i++) {
        cJSON *t = cJSON_AddObjectToObject(hdr, e[i].name);
        if (!t || !cJSON_AddStringToObject(t, "dtype", dsv32_dtype_name(e[i].dtype)))
            goto out;
        cJSON *shape = cJSON_AddArrayToObject(t, "shape");
        for (int d = 0; d < e[i].n_dims; d++)
            cJSON_AddItemToArray(shape, cJSON_CreateNumber((double)e[i].shape[d]));
        uint64_t bytes = entry_bytes(&e[i]);
        cJSON *offs = cJSON_AddArrayToObject(t, "data_offsets");
        cJSON_AddItemToArray(offs, cJSON_CreateNumber((double)off));
        cJSON_AddItemToArray(offs, cJSON_CreateNumber((double)(off + bytes)));
        off += bytes;
    }
    json = cJSON_PrintUnformatted(hdr);
    buf = malloc(chunk ? chunk : 1);
    if (!json || !buf || !chunk)
        goto out;
    size_t hlen = strlen(json);
    size_t padded = (hlen + 7) & ~(size_t)7; /* keep tensor data 8-byte aligned */
    fp = fopen(path, "wb");
    if (!fp) {
        r = dsv32_load_fail(-errno, "%s: cannot create: %s", path, strerror(errno));
        goto out;
    }
    uint8_t lenb[8];
    for (int i = 0; i < 8; i++)
        lenb[i] = (uint8_t)(padded >> (8 * i));
    if (fwrite(lenb, 1, 8, fp) != 8 || fwrite(json, 1, hlen, fp) != hlen)
        goto io;
    for (size_t i = hlen; i < padded; i++)
        if (fputc(' ', fp) == EOF)
            goto io;
    for (int i = 0; i < n; i++) {
        uint64_t bytes = entry_bytes(&e[i]);
        for (uint64_t o = 0; o < bytes; o += chunk) {
            size_t piece = (size_t)(bytes - o < chunk ? bytes - o : chunk);
            if ((r = fill(ctx, i, (size_t)o, buf, piece)) < 0)
                goto out;
            if (fwrite(buf, 1, piece, fp) != piece)
                goto io;
        }
    }
    if (fclose(fp) != 0) {
        fp = NULL;
        goto io;
    }
    fp = NULL;
    r = 0;
    goto out;
io:
    r = dsv32_load_fail(-EIO, "%s: write failed", path);
out:
    if (fp)
        fclose(fp);
    free(buf);
    free(json);
    cJSON_Delete(hdr);
    return r;
}
