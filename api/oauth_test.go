package api_test

import (
	"encoding/base64"
	"encoding/json"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/kmsd-project/kmsd/api/client"
	"github.com/kmsd-project/kmsd/kms"
)

// tokenRequest posts a form to the token endpoint with HTTP Basic
// credentials (none if id is "").
func (e *env) tokenRequest(id, secret string, form url.Values, contentType string) (int, http.Header, map[string]any) {
	e.t.Helper()
	req, err := http.NewRequest("POST", e.url+"/v1/oauth/token", strings.NewReader(form.Encode()))
	if err != nil {
		e.t.Fatal(err)
	}
	if id != "" {
		req.Header.Set("Authorization", "Basic "+base64.StdEncoding.EncodeToString([]byte(url.QueryEscape(id)+":"+url.QueryEscape(secret))))
	}
	req.Header.Set("Content-Type", contentType)
	resp, err := e.httpc.Do(req)
	if err != nil {
		e.t.Fatal(err)
	}
	defer resp.Body.Close()
	var out map[string]any
	_ = json.NewDecoder(resp.Body).Decode(&out)
	return resp.StatusCode, resp.Header, out
}

const formType = "application/x-www-form-urlencoded"

// TestOAuthClientCredentials: kmsd's token endpoint (RFC 6749 4.4 with
// RFC 8707's resource) gives a worker or encryptor token, authenticated
// with HTTP Basic, a short-lived token bound to the resource, of its role
// and keys or fewer, never past its own expiry; the access token does
// nothing at kmsd's API, cannot obtain tokens itself, and dies with its
// client. Every refusal is an RFC 6749 error that changes nothing, and
// every answer has its record.
func TestOAuthClientCredentials(t *testing.T) {
	e := newEnv(t)
	admin := e.client(e.admin)
	// Metadata: none without an issuer, then RFC 8414's document.
	if st, _, _ := e.raw("GET", "/.well-known/oauth-authorization-server", "", "", ""); st != 404 {
		t.Fatalf("metadata without an issuer: %d", st)
	}
	e.api.SetIssuer(e.url)
	st, _, body := e.raw("GET", "/.well-known/oauth-authorization-server", "", "", "")
	var meta client.AuthServerMetadata
	if err := json.Unmarshal(body, &meta); st != 200 || err != nil || meta.Issuer != e.url || meta.TokenEndpoint != e.url+"/v1/oauth/token" ||
		!slices.Equal(meta.GrantTypesSupported, []string{"client_credentials"}) || !slices.Equal(meta.TokenEndpointAuthMethodsSupported, []string{"client_secret_basic"}) ||
		meta.AuthorizationEndpoint != e.url+"/v1/oauth/authorize" {
		t.Fatalf("metadata: %d %s", st, body)
	}
	// The authorization endpoint it names (for SDKs that require one)
	// grants nothing.
	if st, _, body := e.raw("GET", "/v1/oauth/authorize?response_type=code&client_id=x", "", "", ""); st != 400 || !strings.Contains(string(body), "client credentials") {
		t.Fatalf("authorize: %d %s", st, body)
	}

	ev, _ := admin.CreateToken(ctx, client.CreateTokenRequest{Role: "evaluator", Keys: []string{"*"}})
	cl, err := admin.CreateToken(ctx, client.CreateTokenRequest{Name: "agent", Role: "worker", Keys: []string{"team-*"}, TTL: "2h"})
	if err != nil {
		t.Fatal(err)
	}
	const res = "https://mcp.example.net/mcp"
	st, h, out := e.tokenRequest(cl.ID, cl.Token, url.Values{"grant_type": {"client_credentials"}, "resource": {res}}, formType)
	if st != 200 || out["token_type"] != "Bearer" || out["expires_in"] != float64(15*60) || out["scope"] != "worker key:team-*" || h.Get("Cache-Control") != "no-store" {
		t.Fatalf("token: %d %v %v", st, out, h)
	}
	at := out["access_token"].(string)
	in, err := e.client(ev.Token).IntrospectToken(ctx, at)
	if err != nil || !in.Active || in.Role != "worker" || !slices.Equal(in.Keys, []string{"team-*"}) || !slices.Equal(in.Aud, []string{res}) || in.ClientID != cl.ID || in.Scope != "worker key:team-*" ||
		in.Exp != e.clock.Now().Add(15*time.Minute).Unix() {
		t.Fatalf("introspection of the access token: %+v %v", in, err)
	}
	// No passthrough: it does nothing at kmsd's API.
	if _, err := e.client(at).ListKeys(ctx, 10, ""); client.StatusOf(err) != 401 {
		t.Fatalf("the access token at kmsd's API: %v", err)
	}
	// Its record: the client the actor, the new token named, committed
	// with it.
	var issued *kms.AuditRecord
	for _, line := range e.auditLog() {
		if r, err := kms.DecodeAuditRecord(line); err == nil && r.Operation == "POST /v1/oauth/token" && r.Status == 200 {
			issued = r
		}
	}
	if issued == nil || issued.Actor != cl.ID || issued.Role != "worker" || issued.Token != in.TokenID {
		t.Fatalf("the issuance's record: %+v", issued)
	}

	// A narrower scope; another role's scope is not granted (and the
	// answer's scope says so).
	_, _, out = e.tokenRequest(cl.ID, cl.Token, url.Values{"grant_type": {"client_credentials"}, "resource": {res}, "scope": {"worker encryptor key:team-a"}}, formType)
	if out["scope"] != "worker key:team-a" {
		t.Fatalf("narrowed: %v", out)
	}

	count := func() int {
		n, err := e.store.CountTokens(ctx)
		if err != nil {
			t.Fatal(err)
		}
		return n
	}
	before := count()
	acc, _ := admin.CreateToken(ctx, client.CreateTokenRequest{Role: "decryptor", Keys: []string{"*"}})
	before++
	enc, _ := admin.CreateToken(ctx, client.CreateTokenRequest{Role: "encryptor", Keys: []string{"team-*"}, Audience: []string{res, "https://other.example.net/mcp"}})
	before++
	ok := url.Values{"grant_type": {"client_credentials"}, "resource": {res}}
	atID := in.TokenID
	for name, c := range map[string]struct {
		id, secret, ct string
		form           url.Values
		status         int
		code           string
	}{
		"no credentials":                {"", "", formType, ok, 401, "invalid_client"},
		"wrong secret":                  {cl.ID, cl.Token[:len(cl.Token)-2] + "xx", formType, ok, 401, "invalid_client"},
		"id of another token":           {ev.ID, cl.Token, formType, ok, 401, "invalid_client"},
		"not form-encoded":              {cl.ID, cl.Token, "application/json", ok, 415, "invalid_request"},
		"secret in the body":            {cl.ID, cl.Token, formType, url.Values{"grant_type": {"client_credentials"}, "resource": {res}, "client_secret": {cl.Token}}, 400, "invalid_request"},
		"a parameter twice":             {cl.ID, cl.Token, formType, url.Values{"grant_type": {"client_credentials"}, "resource": {res, "https://x.example/mcp"}}, 400, "invalid_request"},
		"an unknown parameter":          {cl.ID, cl.Token, formType, url.Values{"grant_type": {"client_credentials"}, "resource": {res}, "audience": {"x"}}, 400, "invalid_request"},
		"another grant":                 {cl.ID, cl.Token, formType, url.Values{"grant_type": {"password"}, "resource": {res}}, 400, "unsupported_grant_type"},
		"no resource":                   {cl.ID, cl.Token, formType, url.Values{"grant_type": {"client_credentials"}}, 400, "invalid_target"},
		"resource not https":            {cl.ID, cl.Token, formType, url.Values{"grant_type": {"client_credentials"}, "resource": {"http://mcp.example.net/mcp"}}, 400, "invalid_target"},
		"wildcard resource":             {cl.ID, cl.Token, formType, url.Values{"grant_type": {"client_credentials"}, "resource": {"https://0.0.0.0:8421/mcp"}}, 400, "invalid_target"},
		"keys beyond the client":        {cl.ID, cl.Token, formType, url.Values{"grant_type": {"client_credentials"}, "resource": {res}, "scope": {"key:*"}}, 400, "invalid_scope"},
		"an unknown scope":              {cl.ID, cl.Token, formType, url.Values{"grant_type": {"client_credentials"}, "resource": {res}, "scope": {"openid"}}, 400, "invalid_scope"},
		"an access token":               {atID, at, formType, ok, 400, "unauthorized_client"},
		"an admin":                      {e.admin[4:20], e.admin, formType, ok, 400, "unauthorized_client"},
		"a decryptor":                   {acc.ID, acc.Token, formType, ok, 400, "unauthorized_client"},
		"outside its audience":          {enc.ID, enc.Token, formType, url.Values{"grant_type": {"client_credentials"}, "resource": {"https://third.example.net/mcp"}}, 400, "invalid_target"},
		"several audiences, none named": {enc.ID, enc.Token, formType, url.Values{"grant_type": {"client_credentials"}}, 400, "invalid_target"},
	} {
		st, h, out := e.tokenRequest(c.id, c.secret, c.form, c.ct)
		if st != c.status || out["error"] != c.code || out["error_description"] == "" || out["type"] != "urn:kmsd:problem:oauth-"+c.code {
			t.Errorf("%s: %d %v", name, st, out)
		}
		if st == 401 && !strings.HasPrefix(h.Get("WWW-Authenticate"), "Basic") {
			t.Errorf("%s: 401 without a Basic challenge: %v", name, h)
		}
	}
	if n := count(); n != before {
		t.Fatalf("refused token requests made tokens: %d, want %d", n, before)
	}
	// A client bound to one resource gets a token for it without naming
	// it; one bound to several gets one for a resource it names.
	single, _ := admin.CreateToken(ctx, client.CreateTokenRequest{Role: "worker", Keys: []string{"team-a"}, Audience: []string{res}, TTL: "5m"})
	_, _, out = e.tokenRequest(single.ID, single.Token, url.Values{"grant_type": {"client_credentials"}}, formType)
	if out["access_token"] == nil || out["expires_in"] != float64(5*60) {
		t.Fatalf("a single-audience client, no resource named (and expiring in 5m, before 15m): %v", out)
	}
	singleAT := out["access_token"].(string)
	if in, _ := e.client(ev.Token).IntrospectToken(ctx, singleAT); !slices.Equal(in.Aud, []string{res}) {
		t.Fatalf("bound to: %v", in.Aud)
	}
	if _, _, out = e.tokenRequest(enc.ID, enc.Token, url.Values{"grant_type": {"client_credentials"}, "resource": {"https://other.example.net/mcp"}}, formType); out["scope"] != "encryptor key:team-*" {
		t.Fatalf("an encryptor client: %v", out)
	}

	// Revoking the client ends its access tokens.
	if _, err := admin.RevokeToken(ctx, cl.ID); err != nil {
		t.Fatal(err)
	}
	if in, err := e.client(ev.Token).IntrospectToken(ctx, at); err != nil || in.Active {
		t.Fatalf("an access token of a revoked client: %+v %v", in, err)
	}
	if st, _, out := e.tokenRequest(cl.ID, cl.Token, ok, formType); st != 401 || out["error"] != "invalid_client" {
		t.Fatalf("a revoked client: %d %v", st, out)
	}
	// Past the client's expiry its access tokens are expired too.
	if in, _ := e.client(ev.Token).IntrospectToken(ctx, singleAT); !in.Active {
		t.Fatal("an access token of a live client is inactive")
	}
	e.clock.Add(6 * time.Minute)
	if in, _ := e.client(ev.Token).IntrospectToken(ctx, singleAT); in.Active {
		t.Fatal("an access token outlived its client")
	}
	// Every answer had its record; refusals before authentication are the
	// anonymous's, after it the client's.
	var refused, anon int
	for _, line := range e.auditLog() {
		r, err := kms.DecodeAuditRecord(line)
		if err != nil || r.Operation != "POST /v1/oauth/token" || r.Status == 200 {
			continue
		}
		refused++
		if r.Actor == "anonymous" {
			anon++
		}
		if !strings.HasPrefix(r.Problem, "oauth-") {
			t.Errorf("a refusal's record: %+v", r)
		}
	}
	if refused != 19 || anon != 8 {
		t.Fatalf("%d refusals recorded (%d anonymous), want 19 (8)", refused, anon)
	}
	// The client secrets are nowhere in the store or the log.
	snap := e.snapshot() + e.log.String()
	for _, tok := range []string{cl.Token, at, enc.Token} {
		if strings.Contains(snap, tok[len("kms_")+17:]) {
			t.Fatal("a secret from a token request was recorded or logged")
		}
	}
}
