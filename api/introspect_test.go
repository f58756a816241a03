package api_test

import (
	"strings"
	"testing"
	"time"

	"github.com/kmsd-project/kmsd/api/client"
	"github.com/kmsd-project/kmsd/kms"
)

// TestIntrospection: an evaluator service (kmsd-mcp) learns whether a
// token of a party it serves is active and what it may do; an inactive
// token of any kind, and one beyond the caller's scope (another role, or
// keys outside its patterns: an outside review found any worker could
// introspect the admin's token), answers only active=false; roles without
// the permission (workers now among them), and anonymous callers, are
// refused; the record names the token checked, by id; the secret in the
// body appears in no record or log.
func TestIntrospection(t *testing.T) {
	e := newEnv(t)
	admin := e.client(e.admin)
	worker, err := admin.CreateToken(ctx, client.CreateTokenRequest{Name: "mcp", Role: "evaluator", Keys: []string{"team-*"}})
	if err != nil {
		t.Fatal(err)
	}
	user, _ := admin.CreateToken(ctx, client.CreateTokenRequest{Role: "worker", Keys: []string{"team-a-*"}, TTL: "1h"})
	dec, _ := admin.CreateToken(ctx, client.CreateTokenRequest{Role: "decryptor", Keys: []string{"team-a-*"}})
	wide, _ := admin.CreateToken(ctx, client.CreateTokenRequest{Role: "worker", Keys: []string{"*"}})
	plainWorker, _ := admin.CreateToken(ctx, client.CreateTokenRequest{Role: "worker", Keys: []string{"team-*"}})
	revoked, _ := admin.CreateToken(ctx, client.CreateTokenRequest{Role: "worker", Keys: []string{"x"}})
	admin.RevokeToken(ctx, revoked.ID)
	short, _ := admin.CreateToken(ctx, client.CreateTokenRequest{Role: "worker", Keys: []string{"x"}, TTL: "1m"})
	w := e.client(worker.Token)

	got, err := w.IntrospectToken(ctx, user.Token)
	if err != nil {
		t.Fatal(err)
	}
	if !got.Active || got.Role != "worker" || got.TokenID != user.ID || len(got.Keys) != 1 || got.Keys[0] != "team-a-*" || got.TokenType != "Bearer" || got.Exp != user.ExpiresAt.Unix() {
		t.Fatalf("introspection of an active token: %+v", got)
	}
	// Beyond the caller's scope: nothing but active=false.
	for name, tok := range map[string]string{"the admin's": e.admin, "a decryptor's": dec.Token, "keys beyond its patterns": wide.Token} {
		if got, err := w.IntrospectToken(ctx, tok); err != nil || got.Active || got.Role != "" || got.TokenID != "" {
			t.Errorf("%s token: %+v %v", name, got, err)
		}
	}
	// A token may ask about itself (kmsd-mcp reads its own expiry).
	if got, _ := w.IntrospectToken(ctx, worker.Token); !got.Active || got.Role != "evaluator" {
		t.Fatalf("an evaluator about itself: %+v", got)
	}
	// The bootstrap admin (every key) may ask about any token.
	if got, _ := admin.IntrospectToken(ctx, e.admin); !got.Active || got.Role != "admin" || got.Exp != 0 {
		t.Fatalf("the bootstrap admin token (no expiry), asked by an admin: %+v", got)
	}
	if got, _ := admin.IntrospectToken(ctx, dec.Token); !got.Active || got.Role != "decryptor" {
		t.Fatalf("a decryptor token, asked by an admin: %+v", got)
	}
	// The record names the token checked.
	st, h, _ := e.raw("POST", "/v1/tokens/introspect", worker.Token, "application/json", `{"token":"`+dec.Token+`"}`)
	if st != 200 {
		t.Fatalf("introspect: %d", st)
	}
	found := false
	for _, line := range e.auditLog() {
		if r, err := kms.DecodeAuditRecord(line); err == nil && r.RequestID == h.Get("X-Request-Id") {
			found = r.Token == dec.ID
		}
	}
	if !found {
		t.Error("the introspection's record does not name the token checked")
	}
	if _, err := e.client(plainWorker.Token).IntrospectToken(ctx, user.Token); client.StatusOf(err) != 403 {
		t.Errorf("a worker introspects: %v", err)
	}
	e.clock.Add(2 * time.Minute)
	wrongSecret := user.Token[:len(user.Token)-1] + map[bool]string{true: "b", false: "a"}[strings.HasSuffix(user.Token, "a")]
	for name, tok := range map[string]string{"revoked": revoked.Token, "expired": short.Token, "wrong secret": wrongSecret, "unknown": "kms_0123456789abcdef_" + strings.Repeat("x", 43), "malformed": "garbage", "empty": ""} {
		got, err := w.IntrospectToken(ctx, tok)
		if err != nil || got.Active || got.Role != "" || got.TokenID != "" || got.Keys != nil || got.Exp != 0 {
			t.Errorf("%s: %+v %v", name, got, err)
		}
	}
	// Introspection is not a use of the token.
	info, _ := admin.GetToken(ctx, user.ID)
	if info.LastUsedAt != nil {
		t.Errorf("introspection marked the token used at %v", info.LastUsedAt)
	}
	// Who may ask.
	if _, err := e.client(dec.Token).IntrospectToken(ctx, worker.Token); client.StatusOf(err) != 403 {
		t.Errorf("a decryptor introspects: %v", err)
	}
	if st, h, _ := e.raw("POST", "/v1/tokens/introspect", "", "application/json", `{"token":"`+user.Token+`"}`); st != 401 || h.Get("WWW-Authenticate") == "" {
		t.Errorf("anonymous introspection: %d %v", st, h)
	}
	if st, _, _ := e.raw("POST", "/v1/tokens/introspect", worker.Token, "application/json", `{"token":1}`); st != 400 {
		t.Errorf("a token that is not a string: %d", st)
	}
	// The secrets in the bodies are nowhere in the store or the log.
	snap := e.snapshot() + e.log.String()
	for _, tok := range []string{user.Token, revoked.Token, short.Token} {
		secret := tok[len("kms_")+16+1:] // kms_<16 hex id>_<secret>; the secret may hold "_"
		if strings.Contains(snap, secret) {
			t.Fatal("a token secret from an introspection body was recorded or logged")
		}
	}
}

// TestAudienceBoundTokens (RFC 8707): a token made with an audience is
// refused by kmsd's own API (no passthrough: it is for another resource),
// its introspection says its audience, and an audience that is not an
// absolute https URI (http only to loopback) is refused at creation.
func TestAudienceBoundTokens(t *testing.T) {
	e := newEnv(t)
	admin := e.client(e.admin)
	ev, _ := admin.CreateToken(ctx, client.CreateTokenRequest{Role: "evaluator", Keys: []string{"*"}})
	const aud = "https://mcp.example.net/mcp"
	bound, err := admin.CreateToken(ctx, client.CreateTokenRequest{Role: "worker", Keys: []string{"*"}, Audience: []string{aud}})
	if err != nil || len(bound.Audience) != 1 || bound.Audience[0] != aud {
		t.Fatalf("create: %+v %v", bound, err)
	}
	if _, err := e.client(bound.Token).ListKeys(ctx, 10, ""); client.StatusOf(err) != 401 {
		t.Fatalf("kmsd's API took a token bound to another resource: %v", err)
	}
	got, err := e.client(ev.Token).IntrospectToken(ctx, bound.Token)
	if err != nil || !got.Active || len(got.Aud) != 1 || got.Aud[0] != aud {
		t.Fatalf("introspection of a bound token: %+v %v", got, err)
	}
	if info, _ := admin.GetToken(ctx, bound.ID); len(info.Audience) != 1 {
		t.Fatalf("token metadata: %+v", info)
	}
	for _, bad := range [][]string{{"mcp.example.net"}, {"http://mcp.example.net/mcp"}, {"https://u:p@mcp.example.net/"}, {"https://mcp.example.net/#x"}, {"ftp://x/"}, {"a", "b", "c", "d", "e"}} {
		if _, err := admin.CreateToken(ctx, client.CreateTokenRequest{Role: "worker", Keys: []string{"*"}, Audience: bad}); client.StatusOf(err) != 400 {
			t.Errorf("audience %q: %v", bad, err)
		}
	}
	if _, err := admin.CreateToken(ctx, client.CreateTokenRequest{Role: "worker", Keys: []string{"*"}, Audience: []string{"http://127.0.0.1:8421/mcp"}}); err != nil {
		t.Errorf("a loopback http audience: %v", err)
	}
	// A wildcard address names every server; a bound token cannot renew
	// (renewals are made at kmsd, which it does not work at).
	for _, req := range []client.CreateTokenRequest{
		{Role: "worker", Keys: []string{"*"}, Audience: []string{"https://0.0.0.0:8421/mcp"}},
		{Role: "worker", Keys: []string{"*"}, Audience: []string{"https://[::]:8421/mcp"}},
		{Role: "worker", Keys: []string{"*"}, Audience: []string{aud}, TTL: "1h", MaxLifetime: "24h"},
	} {
		if _, err := admin.CreateToken(ctx, req); client.StatusOf(err) != 400 {
			t.Errorf("%+v: %v", req, err)
		}
	}
	// An admin scoped to some keys learns nothing of tokens beyond them
	// (the bootstrap admin's, say).
	scoped, _ := admin.CreateToken(ctx, client.CreateTokenRequest{Role: "admin", Keys: []string{"team-*"}})
	if got, err := e.client(scoped.Token).IntrospectToken(ctx, e.admin); err != nil || got.Active {
		t.Errorf("a scoped admin introspected the bootstrap admin's token: %+v %v", got, err)
	}
	inScope, _ := admin.CreateToken(ctx, client.CreateTokenRequest{Role: "worker", Keys: []string{"team-a"}})
	if got, err := e.client(scoped.Token).IntrospectToken(ctx, inScope.Token); err != nil || !got.Active {
		t.Errorf("a scoped admin, a token within its scope: %+v %v", got, err)
	}
}
