package api_test

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/getkin/kin-openapi/openapi3"
	"github.com/getkin/kin-openapi/openapi3filter"
	"github.com/getkin/kin-openapi/routers"
	"github.com/getkin/kin-openapi/routers/legacy"
	"github.com/go-chi/chi/v5"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/kmsd-project/kmsd/api"
	"github.com/kmsd-project/kmsd/api/client"
	"github.com/kmsd-project/kmsd/audit"
	"github.com/kmsd-project/kmsd/audit/engine"
	"github.com/kmsd-project/kmsd/he"
	"github.com/kmsd-project/kmsd/internal/app"
	"github.com/kmsd-project/kmsd/internal/testetcd"
	"github.com/kmsd-project/kmsd/internal/testhsm"
	"github.com/kmsd-project/kmsd/internal/testutil"
	"github.com/kmsd-project/kmsd/kms"
	"github.com/kmsd-project/kmsd/store/bolt"
	"github.com/kmsd-project/kmsd/store/etcd"
)

func TestMain(m *testing.M) { testhsm.Main(m) }

type env struct {
	t       *testing.T
	url     string
	svc     *kms.Service
	store   testStore
	bolt    *bolt.Store // when the store is bbolt
	etcd    *etcd.Store // when the store is etcd, with its client
	etcdCli *clientv3.Client
	clock   *testutil.Clock
	admin   string
	log     *testutil.Buffer
	httpc   *http.Client
	checker *specChecker
	alog    *audit.Log
	idPub   []byte
	stream  *recordingSink
	rand    *testutil.RecordingRand
	blobs   he.Blobs
	blobDir string
	api     *api.Server
}

func (e *env) blobsDir() string { return e.blobDir }

// recordingSink is a RecordSink that keeps what it gets.
type recordingSink struct {
	mu   sync.Mutex
	recs [][]byte
}

func (r *recordingSink) Emit(b []byte) {
	r.mu.Lock()
	r.recs = append(r.recs, b)
	r.mu.Unlock()
}

var spec = func() *openapi3.T {
	doc, err := openapi3.NewLoader().LoadFromFile("../openapi.yaml")
	if err != nil {
		panic(err)
	}
	return doc
}()

// newEnv starts the API on 127.0.0.1 over a real SoftHSM token and a bbolt
// file. Every response the tests receive is validated against openapi.yaml.
func newEnv(t *testing.T) *env { return newEnvWith(t, nil, nil, nil) }

// testTransport reaches the current test's server over HTTPS, trusting its
// CA (tests in this package run one at a time).
var testTransport *http.Transport

// testOptions, when set, changes the API's options (tests in this package
// run one at a time).
var testOptions func(*api.Options)

// testAsyncKeysetBytes, when set, makes smaller keysets go to the
// background (tests run one at a time in this package).
var testAsyncKeysetBytes int64

// testMaxKeysetBytes, when set, is the service's --max-keyset-mib in bytes
// (tests run one at a time in this package).
var testMaxKeysetBytes int64

// newEnvWith lets a test wrap the real sealer and stores to inject faults.
func newEnvWith(t *testing.T, wrapSealer func(kms.Sealer) kms.Sealer, wrapStore func(kms.Store) kms.Store, wrapAudit func(kms.AuditStore) kms.AuditStore) *env {
	t.Helper()
	return newEnvOn(t, "bolt", wrapSealer, wrapStore, wrapAudit)
}

// testStore is what the tests need of a store.
type testStore interface {
	kms.Store
	Audit() *engine.Log
}

// backends are the stores the fault tests run against.
var backends = []string{"bolt", "etcd"}

// newEnvOn is newEnvWith on the named store: "bolt" (a bbolt file) or
// "etcd" (a one-member etcd started for the test).
func newEnvOn(t *testing.T, backend string, wrapSealer func(kms.Sealer) kms.Sealer, wrapStore func(kms.Store) kms.Store, wrapAudit func(kms.AuditStore) kms.AuditStore) *env {
	t.Helper()
	e := &env{t: t, clock: testutil.NewClock(time.Now().UTC()), log: &testutil.Buffer{}, stream: &recordingSink{}, rand: &testutil.RecordingRand{}}
	switch backend {
	case "bolt":
		st, err := bolt.Open(filepath.Join(t.TempDir(), "kms.db"), bolt.Options{Sealer: testhsm.Open(t)})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { st.Close() })
		e.store, e.bolt = st, st
	case "etcd":
		c := testetcd.Start(t, 1)
		cli, err := clientv3.New(etcd.ClientConfig(c.Endpoints(), nil))
		if err != nil {
			t.Fatal(err)
		}
		st, err := etcd.Open(context.Background(), cli, etcd.Options{Prefix: "/api-test/", Sealer: testhsm.Open(t)})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { st.Close(); cli.Close() })
		e.store, e.etcd, e.etcdCli = st, st, cli
	default:
		t.Fatalf("no backend %q", backend)
	}
	st := e.store
	var sealer kms.Sealer = testhsm.Open(t)
	var store kms.Store = st
	if wrapSealer != nil {
		sealer = wrapSealer(sealer)
	}
	if wrapStore != nil {
		store = wrapStore(store)
	}
	e.blobDir = filepath.Join(t.TempDir(), "blobs")
	var auditStore kms.AuditStore = st.Audit()
	if wrapAudit != nil {
		auditStore = wrapAudit(st.Audit())
	}
	cfg := app.Config{Store: store, AuditStore: auditStore, Sealer: sealer, BlobDir: e.blobDir, HEWorkers: 2,
		Logger:     slog.New(slog.NewJSONHandler(e.log, nil)),
		Service:    kms.Config{Clock: e.clock, Rand: e.rand, CacheTTL: -1, AsyncKeysetBytes: testAsyncKeysetBytes, MaxKeysetBytes: testMaxKeysetBytes},
		API:        api.Options{Stream: e.stream},
		AdminToken: func(tok string) error { e.admin = tok; return nil }}
	if testOptions != nil {
		testOptions(&cfg.API)
	}
	a, err := app.New(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(a.Close)
	e.svc, e.alog, e.blobs, e.api, e.idPub = a.Service, a.Audit, a.Blobs, a.API, a.Identity
	// HTTPS with kmsd's own TLS configuration, under a CA made for the test.
	srv, caFile := testutil.TLSServer(t, e.api.Handler())
	e.url = srv.URL
	clientTLS, err := client.TLSConfig(caFile, "", "")
	if err != nil {
		t.Fatal(err)
	}
	testTransport = &http.Transport{TLSClientConfig: clientTLS}
	t.Cleanup(testTransport.CloseIdleConnections)
	e.checker = newSpecChecker(t)
	e.httpc = &http.Client{Transport: e.checker}
	return e
}

func (e *env) client(token string) *client.Client {
	c, err := client.New(e.url, token, client.WithHTTPClient(e.httpc))
	if err != nil {
		e.t.Fatal(err)
	}
	return c
}

// raw sends a request and returns status, headers and body.
func (e *env) raw(method, path, token, contentType, body string) (int, http.Header, []byte) {
	e.t.Helper()
	req, err := http.NewRequest(method, e.url+path, strings.NewReader(body))
	if err != nil {
		e.t.Fatal(err)
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	resp, err := e.httpc.Do(req)
	if err != nil {
		e.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, resp.Header, b
}

// specChecker validates every response against openapi.yaml.
type specChecker struct {
	t      *testing.T
	router routers.Router
}

func init() {
	// JSON lines are text to the validator: their schema is a string.
	openapi3filter.RegisterBodyDecoder("application/jsonl", openapi3filter.PlainBodyDecoder)
}

func newSpecChecker(t *testing.T) *specChecker {
	doc := *spec
	doc.Servers = nil
	r, err := legacy.NewRouter(&doc)
	if err != nil {
		t.Fatal(err)
	}
	return &specChecker{t: t, router: r}
}

func (c *specChecker) RoundTrip(req *http.Request) (*http.Response, error) {
	resp, err := testTransport.RoundTrip(req)
	if err != nil {
		return nil, err
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		return nil, err
	}
	resp.Body = io.NopCloser(bytes.NewReader(body))
	// The OAuth token endpoint's refusals are RFC 6749's application/json
	// (with the problem fields in them).
	oauthJSON := req.URL.Path == "/v1/oauth/token" && resp.StatusCode < 500 && resp.Header.Get("Content-Type") == "application/json"
	if resp.StatusCode >= 400 && resp.Header.Get("Content-Type") != "application/problem+json" && !oauthJSON {
		c.t.Errorf("%s %s: %d with Content-Type %q, want application/problem+json", req.Method, req.URL.Path, resp.StatusCode, resp.Header.Get("Content-Type"))
	}
	route, params, err := c.router.FindRoute(req)
	if err != nil {
		// Only unknown endpoints may be missing from the spec.
		if resp.StatusCode != http.StatusNotFound && resp.StatusCode != http.StatusMethodNotAllowed {
			c.t.Errorf("%s %s answered %d but is not in openapi.yaml", req.Method, req.URL.Path, resp.StatusCode)
		}
		return resp, nil
	}
	in := &openapi3filter.ResponseValidationInput{
		RequestValidationInput: &openapi3filter.RequestValidationInput{Request: req, PathParams: params, Route: route,
			Options: &openapi3filter.Options{AuthenticationFunc: openapi3filter.NoopAuthenticationFunc}},
		Status: resp.StatusCode, Header: resp.Header,
		Options: &openapi3filter.Options{IncludeResponseStatus: true},
	}
	in.SetBodyBytes(body)
	if err := openapi3filter.ValidateResponse(context.Background(), in); err != nil {
		c.t.Errorf("%s %s: response %d does not match openapi.yaml: %v\nbody: %s", req.Method, req.URL.Path, resp.StatusCode, err, body)
	}
	return resp, nil
}

// TestSpecMatchesRouter fails when a route is missing from openapi.yaml or
// the spec names a route the router lacks.
func TestSpecMatchesRouter(t *testing.T) {
	if err := spec.Validate(context.Background()); err != nil {
		t.Fatalf("openapi.yaml is not a valid OpenAPI document: %v", err)
	}
	var inRouter, inSpec []string
	h := api.New(nil, nil, api.Options{Audit: &engine.Log{}, Prover: &audit.Log{}}).Handler().(chi.Routes)
	err := chi.Walk(h, func(method, route string, _ http.Handler, _ ...func(http.Handler) http.Handler) error {
		// chi's catch-all is OpenAPI's {path} that spans segments.
		route = strings.Replace(route, "/v1/audit/tiles/*", "/v1/audit/tiles/{path}", 1)
		inRouter = append(inRouter, method+" "+route)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	for path, item := range spec.Paths.Map() {
		for method := range item.Operations() {
			inSpec = append(inSpec, method+" "+path)
		}
	}
	sort.Strings(inRouter)
	sort.Strings(inSpec)
	for _, r := range inRouter {
		if !slices.Contains(inSpec, r) {
			t.Errorf("route %s is not in openapi.yaml", r)
		}
	}
	for _, r := range inSpec {
		if !slices.Contains(inRouter, r) {
			t.Errorf("openapi.yaml names %s, which the router lacks", r)
		}
	}
	if len(inRouter) < 17 {
		t.Fatalf("walked only %d routes", len(inRouter))
	}
}

func b64(b []byte) string { return base64.StdEncoding.EncodeToString(b) }

func problemType(t *testing.T, body []byte) string {
	t.Helper()
	var p client.Problem
	if err := json.Unmarshal(body, &p); err != nil {
		t.Fatalf("not a problem document: %s", body)
	}
	return strings.TrimPrefix(p.Type, api.ProblemBase)
}

// snapshot is everything a request could change.
func (e *env) snapshot() string {
	var sb strings.Builder
	keys, err := e.store.ListKeys(context.Background(), "", 10000)
	if err != nil {
		e.t.Fatal(err)
	}
	for _, k := range keys {
		b, _ := json.Marshal(k)
		sb.Write(b)
	}
	n, _ := e.store.CountTokens(context.Background())
	fmt.Fprintf(&sb, "tokens=%d", n)
	return sb.String()
}
