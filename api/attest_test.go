package api_test

import (
	"encoding/json"
	"net/http"
	"strings"
	"testing"

	"github.com/kmsd-project/kmsd/api/client"
	"github.com/kmsd-project/kmsd/api/client/hekeys"
)

// TestAttestSeparationOfDuties: who may vouch for a ciphertext and who may
// decrypt it, per role; no token does both; a token cannot create one
// that does what it may not. Every refusal changes nothing.
func TestAttestSeparationOfDuties(t *testing.T) {
	e := newEnv(t)
	admin := e.client(e.admin)
	heKey(t, e, "team-a-he", `{"name":"team-a-he","kind":"ckks","policy":{"params":"ckks-logn13","decrypt_budget":8}}`)
	heKey(t, e, "team-b-he", `{"name":"team-b-he","kind":"ckks","policy":{"params":"ckks-logn13","decrypt_budget":8}}`)
	tokens := map[string]string{}
	for _, role := range []string{"encryptor", "worker", "evaluator", "decryptor", "auditor"} {
		keys := []string{"team-a-*"}
		if role == "auditor" {
			keys = []string{"*"}
		}
		tok, err := admin.CreateToken(ctx, client.CreateTokenRequest{Role: role, Keys: keys})
		if err != nil {
			t.Fatalf("create %s: %v", role, err)
		}
		tokens[role] = tok.Token
	}
	tokens["admin"] = e.admin
	f := &hekeys.Fetcher{BaseURL: e.url, Token: e.admin, IdentityKey: e.idPub, CacheDir: t.TempDir(), HTTP: e.httpc}
	keys, err := f.FetchPublic(ctx, "team-a-he", 1)
	if err != nil {
		t.Fatal(err)
	}
	env, err := keys.Encrypt([]float64{1, 2, 3})
	if err != nil {
		t.Fatal(err)
	}
	input := client.AttestRequest{Digest: env.Digest(), Level: env.Level, Scale: env.Scale, Slots: env.Slots, Op: "encrypt"}
	// The encryptor attests its input.
	res, err := e.client(tokens["encryptor"]).Attest(ctx, "team-a-he", 1, input)
	if err != nil || res.Statement.Type != "input" || res.Statement.Role != "encryptor" || res.Statement.NoiseLog2 <= 0 {
		t.Fatalf("encryptor attests its input: %+v %v", res, err)
	}
	env.Attestation = res.Attestation
	eval := client.AttestRequest{Digest: env.Digest(), Level: env.Level, Scale: env.Scale, Slots: env.Slots, Op: "sum", Inputs: []*client.Attestation{env.Attestation}, Amplification: 1}
	ev, err := e.client(tokens["evaluator"]).Attest(ctx, "team-a-he", 1, eval)
	if err != nil || ev.Statement.Type != "evaluation" || len(ev.Statement.Inputs) != 1 || ev.Statement.Inputs[0].By != res.Statement.By || ev.Statement.NoiseLog2 < res.Statement.NoiseLog2 {
		t.Fatalf("evaluator attests an evaluation: %+v %v", ev, err)
	}
	before := e.snapshot()
	for _, c := range []struct {
		role string
		key  string
		req  client.AttestRequest
		want int
		msg  string
	}{
		{"encryptor", "team-a-he", eval, 403, "may not attest-evaluation"},
		{"evaluator", "team-a-he", input, 403, "may not attest-input"},
		{"worker", "team-a-he", input, 403, "may not attest-input"},
		{"worker", "team-a-he", eval, 403, "may not attest-evaluation"},
		{"decryptor", "team-a-he", input, 403, "may not attest-input"},
		{"decryptor", "team-a-he", eval, 403, "may not attest-evaluation"},
		{"admin", "team-a-he", input, 403, "separation of duties"},
		{"admin", "team-a-he", eval, 403, "separation of duties"},
		{"auditor", "team-a-he", input, 403, "may not read-key"},
		{"encryptor", "team-b-he", input, 403, "may not use key"},
		{"evaluator", "team-a-he", client.AttestRequest{Digest: env.Digest(), Level: 2, Scale: env.Scale, Slots: 3, Op: "sum", Amplification: 1}, 400, "attestations of its inputs"},
		{"evaluator", "team-a-he", client.AttestRequest{Digest: env.Digest(), Level: 2, Scale: env.Scale, Slots: 3, Op: "sum", Inputs: []*client.Attestation{env.Attestation}}, 400, "amplification"},
		{"evaluator", "team-a-he", client.AttestRequest{Digest: env.Digest(), Level: 2, Scale: env.Scale, Slots: 3, Op: "sum", Inputs: []*client.Attestation{{Payload: env.Attestation.Payload, Signature: env.Attestation.Signature[1:], SignedBy: 1}}, Amplification: 1}, 400, "does not verify"},
		{"encryptor", "team-a-he", client.AttestRequest{Digest: "sha256:00", Level: 2, Scale: env.Scale, Slots: 3, Op: "encrypt"}, 400, "digest"},
		{"encryptor", "team-a-he", client.AttestRequest{Digest: env.Digest(), Level: 2, Scale: 0.5, Slots: 3, Op: "encrypt"}, 400, "scale"},
		{"encryptor", "team-a-he", client.AttestRequest{Digest: env.Digest(), Level: 9, Scale: env.Scale, Slots: 3, Op: "encrypt"}, 400, "levels 0 to 2"},
		{"encryptor", "team-a-he", client.AttestRequest{Digest: env.Digest(), Level: 2, Scale: env.Scale, Slots: 3, Op: "Encrypt"}, 400, "op must be"},
	} {
		_, err := e.client(tokens[c.role]).Attest(ctx, c.key, 1, c.req)
		if client.StatusOf(err) != c.want || !strings.Contains(err.Error(), c.msg) {
			t.Errorf("%s attests %s %s: %v, want %d %q", c.role, c.key, c.req.Op, err, c.want, c.msg)
		}
	}
	if e.snapshot() != before {
		t.Fatal("a refused attestation changed the store")
	}
	// An input from another key cannot be an evaluation's input here.
	bkeys, _ := f.FetchPublic(ctx, "team-b-he", 1)
	benv, _ := bkeys.Encrypt([]float64{1})
	encB, _ := admin.CreateToken(ctx, client.CreateTokenRequest{Role: "encryptor", Keys: []string{"team-b-*"}})
	if err := hekeys.AttestInput(ctx, e.client(encB.Token), benv); err != nil {
		t.Fatal(err)
	}
	cross := eval
	cross.Inputs = []*client.Attestation{benv.Attestation}
	if _, err := e.client(tokens["evaluator"]).Attest(ctx, "team-a-he", 1, cross); client.StatusOf(err) != 400 || !strings.Contains(err.Error(), "team-b-he") {
		t.Errorf("an input of another key: %v", err)
	}
	// Neither attesting role decrypts.
	for _, role := range []string{"encryptor", "worker", "evaluator"} {
		if _, err := e.client(tokens[role]).Decrypt(ctx, env); client.StatusOf(err) != 403 {
			t.Errorf("%s decrypts: %v", role, err)
		}
	}
	// A token cannot make one that does what it may not: a decryptor
	// makes no encryptor, a worker no encryptor or evaluator, an
	// encryptor no evaluator, an evaluator no encryptor.
	for _, c := range []struct{ by, role string }{{"decryptor", "encryptor"}, {"worker", "encryptor"}, {"worker", "evaluator"}, {"encryptor", "evaluator"}, {"evaluator", "encryptor"}, {"encryptor", "decryptor"}} {
		if _, err := e.client(tokens[c.by]).CreateToken(ctx, client.CreateTokenRequest{Role: c.role, Keys: []string{"team-a-*"}}); client.StatusOf(err) != 403 {
			t.Errorf("%s creates a %s token: %v", c.by, c.role, err)
		}
	}
	// The decryptor decrypts; its audit record names the attestation and
	// the token that vouched for the ciphertext.
	vals, prec, err := e.client(tokens["decryptor"]).DecryptFull(ctx, env)
	if err != nil || len(vals) != 3 || prec < 6 {
		t.Fatalf("decryptor: %v %d %v", vals, prec, err)
	}
	var found bool
	for _, line := range e.auditLog() {
		var rec map[string]any
		if json.Unmarshal(line, &rec) != nil || rec["operation"] != "POST /v1/keys/{name}/versions/{version}/decrypt" || rec["status"] != float64(http.StatusOK) {
			continue
		}
		found = rec["attestation"] == res.Statement.ID && rec["attester"] == res.Statement.By && rec["attested_op"] == "input:encrypt" && rec["precision"] == float64(prec)
	}
	if !found {
		t.Fatalf("no decryption record names the attestation %s by %s", res.Statement.ID, res.Statement.By)
	}
	// Revoking the encryptor withdraws what it vouched for: its input no
	// longer decrypts, nor counts as an evaluation's input.
	if _, err := admin.RevokeToken(ctx, res.Statement.By); err != nil {
		t.Fatal(err)
	}
	if _, err := e.client(tokens["decryptor"]).Decrypt(ctx, env); client.StatusOf(err) != 400 || !strings.Contains(err.Error(), "revoked or expired") {
		t.Fatalf("an input of a revoked encryptor: %v", err)
	}
	if _, err := e.client(tokens["evaluator"]).Attest(ctx, "team-a-he", 1, eval); client.StatusOf(err) != 400 || !strings.Contains(err.Error(), "revoked or expired") {
		t.Fatalf("an evaluation on a revoked encryptor's input: %v", err)
	}
}
