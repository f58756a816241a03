package main

import (
	"bytes"
	"context"
	"crypto/mlkem"
	"encoding/base64"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/kmsd-project/kmsd/api"
	"github.com/kmsd-project/kmsd/audit"
	"github.com/kmsd-project/kmsd/he"
	"github.com/kmsd-project/kmsd/internal/testhsm"
	"github.com/kmsd-project/kmsd/internal/testutil"
	"github.com/kmsd-project/kmsd/kms"
	"github.com/kmsd-project/kmsd/kms/bolt"
	"github.com/kmsd-project/kmsd/kms/pqc"
)

func TestMain(m *testing.M) { testhsm.Main(m) }

// server starts the real API (audited) over SoftHSM and bbolt on 127.0.0.1
// and returns its URL and an admin token.
func server(t *testing.T) (string, string) {
	url, admin, _ := auditedServer(t)
	return url, admin
}

func auditedServer(t *testing.T) (string, string, *audit.Log) {
	st, err := bolt.Open(filepath.Join(t.TempDir(), "kms.db"), bolt.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	blobs, err := he.OpenBlobStore(filepath.Join(t.TempDir(), "blobs"))
	if err != nil {
		t.Fatal(err)
	}
	svc, err := kms.NewService(kms.Config{Store: st, Sealer: testhsm.Open(t), Kinds: kms.NewRegistry(append(pqc.Kinds(), he.Kinds(blobs, 0)...)...), Audit: true,
		AsyncKeysetBytes: 1 << 20}) // HE keysets in these tests go to the background
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	svc.EnsureIdentity(ctx)
	var admin string
	svc.EnsureAdminToken(ctx, func(tok string) error { admin = tok; return nil })
	_, pub, _ := svc.Identity(ctx)
	alog := audit.New(audit.Config{Store: st, PublicKey: pub, Sign: func(ctx context.Context, m []byte) ([]byte, error) {
		sig, _, err := svc.SignAsIdentity(ctx, m, nil)
		return sig, err
	}})
	// HTTPS with kmsd's TLS configuration; kmsctl trusts the test CA
	// through KMS_CACERT (see kmsctl below).
	srv, caFile := testutil.TLSServer(t, api.New(svc, nil, api.Options{Audit: st, Prover: alog}).Handler())
	testCA = caFile
	return srv.URL, admin, alog
}

// testCA is the CA of the current test's server (tests run one at a time).
var testCA string

type result struct {
	code           int
	stdout, stderr string
}

func kmsctl(t *testing.T, env map[string]string, args ...string) result {
	t.Helper()
	var out, errb bytes.Buffer
	code := run(context.Background(), args, func(k string) string {
		if k == "KMS_CACERT" && env[k] == "" {
			return testCA
		}
		return env[k]
	}, &out, &errb)
	return result{code, out.String(), errb.String()}
}

func TestCommands(t *testing.T) {
	url, admin := server(t)
	env := map[string]string{"KMS_ADDR": url, "KMS_TOKEN": admin}
	ok := func(args ...string) string {
		t.Helper()
		r := kmsctl(t, env, args...)
		if r.code != exitOK {
			t.Fatalf("kmsctl %v: exit %d: %s", args, r.code, r.stderr)
		}
		return r.stdout
	}
	var key struct {
		Name           string `json:"name"`
		PrimaryVersion int    `json:"primary_version"`
	}
	json.Unmarshal([]byte(ok("keys", "create", "sig", "--kind", "ml-dsa-65", "--destroy-wait-days", "5")), &key)
	if key.Name != "sig" || key.PrimaryVersion != 1 {
		t.Fatalf("create: %+v", key)
	}
	ok("keys", "create", "--kind", "ml-kem-768", "kem") // flags before the name
	if !strings.Contains(ok("keys", "list", "--limit", "1"), `"kem"`) {
		t.Fatal("keys list misses a key on the second page")
	}
	ok("keys", "show", "sig")
	msg := base64.StdEncoding.EncodeToString([]byte("hello"))
	var sig struct {
		Signature string `json:"signature"`
		Version   int    `json:"version"`
	}
	json.Unmarshal([]byte(ok("sign", "sig", "--message", msg)), &sig)
	if sig.Version != 1 || sig.Signature == "" {
		t.Fatalf("sign: %+v", sig)
	}
	ok("verify", "sig", "--version", "1", "--signature", sig.Signature, "--message", msg)
	bad := kmsctl(t, env, "verify", "sig", "--version", "1", "--signature", sig.Signature, "--message", base64.StdEncoding.EncodeToString([]byte("hellp")))
	if bad.code != exitInvalid || !strings.Contains(bad.stdout, `"valid": false`) {
		t.Fatalf("verify of a wrong message: exit %d %s", bad.code, bad.stdout)
	}
	ok("keys", "rotate", "sig")
	ok("keys", "rotate", "sig")
	var shown struct {
		Versions []struct {
			Version int `json:"version"`
		} `json:"versions"`
		Next string `json:"next_versions_page_token"`
	}
	json.Unmarshal([]byte(ok("keys", "show", "sig", "--versions", "2")), &shown)
	if len(shown.Versions) != 2 || shown.Versions[0].Version != 3 || shown.Next != "2" {
		t.Fatalf("keys show --versions 2: %+v", shown)
	}
	var all []struct {
		Version int `json:"version"`
	}
	json.Unmarshal([]byte(ok("keys", "versions", "sig", "--limit", "2")), &all)
	if len(all) != 3 || all[0].Version != 3 || all[2].Version != 1 {
		t.Fatalf("keys versions over pages of 2: %+v", all)
	}
	ok("keys", "update", "sig", "--min-decryption-version", "1", "--destroy-wait-days", "9")
	ok("versions", "disable", "sig", "1")
	ok("versions", "enable", "sig", "1")
	if out := ok("versions", "schedule-destroy", "sig", "1", "--days", "3"); !strings.Contains(out, "destroy_scheduled") {
		t.Fatalf("schedule-destroy: %s", out)
	}
	if out := ok("versions", "cancel-destroy", "sig", "1"); !strings.Contains(out, `"disabled"`) {
		t.Fatalf("cancel-destroy: %s", out)
	}
	var pk struct {
		PublicKey []byte `json:"public_key"`
	}
	out := filepath.Join(t.TempDir(), "kem.pub")
	json.Unmarshal([]byte(ok("public-key", "kem", "--out", out)), &pk)
	ek, err := mlkem.NewEncapsulationKey768(pk.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	ss, ct := ek.Encapsulate()
	var dec struct {
		SharedSecret []byte `json:"shared_secret"`
	}
	json.Unmarshal([]byte(ok("decapsulate", "kem", "--version", "1", "--ciphertext", base64.StdEncoding.EncodeToString(ct))), &dec)
	if !bytes.Equal(dec.SharedSecret, ss) {
		t.Fatal("decapsulate returned another secret")
	}
	var tok struct {
		Token string `json:"token"`
	}
	json.Unmarshal([]byte(ok("tokens", "create", "--role", "worker", "--keys", "kem,sig")), &tok)
	if !strings.HasPrefix(tok.Token, "kms_") {
		t.Fatalf("tokens create: %+v", tok)
	}
	if !strings.Contains(ok("identity"), `"ml-dsa-65"`) {
		t.Fatal("identity")
	}
	var short struct {
		ID        string `json:"id"`
		ExpiresAt string `json:"expires_at"`
	}
	json.Unmarshal([]byte(ok("tokens", "create", "--role", "worker", "--keys", "kem", "--ttl", "1h")), &short)
	if short.ExpiresAt == "" {
		t.Fatal("tokens create --ttl: no expiry")
	}
	if l := ok("tokens", "list"); !strings.Contains(l, short.ID) || strings.Contains(l, "kms_") {
		t.Fatalf("tokens list: %s", l)
	}
	if !strings.Contains(ok("tokens", "show", short.ID), short.ID) {
		t.Fatal("tokens show")
	}
	if !strings.Contains(ok("tokens", "revoke", short.ID), "revoked_at") {
		t.Fatal("tokens revoke")
	}

	// Exit codes.
	worker := map[string]string{"KMS_ADDR": url, "KMS_TOKEN": tok.Token}
	for _, c := range []struct {
		env  map[string]string
		args []string
		code int
	}{
		{env, []string{"keys", "show", "nope"}, exitRefused},
		{env, []string{"keys", "create", "Bad", "--kind", "ml-dsa-65"}, exitRefused},
		{worker, []string{"keys", "rotate", "sig"}, exitRefused},
		{map[string]string{"KMS_ADDR": url}, []string{"keys", "list"}, exitRefused},
		{env, []string{"keys", "show"}, exitUsage},
		{env, []string{"keys", "create", "x"}, exitUsage},
		{env, []string{"versions", "disable", "sig", "one"}, exitUsage},
		{env, []string{"frobnicate"}, exitUsage},
		{env, []string{"keys", "show", "sig", "--bogus"}, exitUsage},
		{env, []string{"sign", "sig", "--message", "***"}, exitUsage},
		{map[string]string{"KMS_ADDR": "http://127.0.0.1:1"}, []string{"keys", "list"}, exitFailure},
		{env, []string{"--help"}, exitOK},
		{env, []string{"verify", "--help"}, exitOK},
	} {
		if r := kmsctl(t, c.env, c.args...); r.code != c.code {
			t.Errorf("kmsctl %v: exit %d, want %d (%s)", c.args, r.code, c.code, r.stderr)
		}
	}
}

func TestAuditVerifyAndExport(t *testing.T) {
	url, admin, alog := auditedServer(t)
	env := map[string]string{"KMS_ADDR": url, "KMS_TOKEN": admin}
	for i := 0; i < 5; i++ {
		kmsctl(t, env, "keys", "create", fmt.Sprintf("k%d", i), "--kind", "ml-dsa-44")
	}
	alog.Checkpoint(context.Background())
	dir := t.TempDir()
	idFile, saved := filepath.Join(dir, "identity.pub"), filepath.Join(dir, "saved.checkpoint")
	r := kmsctl(t, env, "audit", "verify", "--identity-key-file", idFile, "--fetch-identity", "--save-checkpoint", saved)
	if r.code != exitOK || !strings.Contains(r.stdout, "audit log intact") || !strings.Contains(r.stdout, "pinned") {
		t.Fatalf("live verify: %d %s %s", r.code, r.stdout, r.stderr)
	}
	exp := filepath.Join(dir, "export")
	if r := kmsctl(t, env, "audit", "export", "--out", exp); r.code != exitOK {
		t.Fatalf("export: %d %s", r.code, r.stderr)
	}
	if r := kmsctl(t, env, "audit", "verify", "--identity-key-file", idFile, "--export", exp, "--saved-checkpoint", saved); r.code != exitOK {
		t.Fatalf("export verify: %d %s %s", r.code, r.stdout, r.stderr)
	}
	// More records and a newer checkpoint: the live log extends the saved one.
	kmsctl(t, env, "keys", "rotate", "k1")
	alog.Checkpoint(context.Background())
	if r := kmsctl(t, env, "audit", "verify", "--identity-key-file", idFile, "--saved-checkpoint", saved, "--save-checkpoint", saved); r.code != exitOK {
		t.Fatalf("live verify against the saved checkpoint: %d %s %s", r.code, r.stdout, r.stderr)
	}
	// The old export is now a rollback relative to the newer saved checkpoint.
	r = kmsctl(t, env, "audit", "verify", "--identity-key-file", idFile, "--export", exp, "--saved-checkpoint", saved)
	if r.code != exitInvalid || !strings.Contains(r.stdout, "NOT intact") || !strings.Contains(r.stdout, "rollback") {
		t.Fatalf("rollback: %d %s", r.code, r.stdout)
	}
	// A changed record in the export.
	recs := filepath.Join(exp, "records.jsonl")
	b, _ := os.ReadFile(recs)
	os.WriteFile(recs, bytes.Replace(b, []byte(`"status":201`), []byte(`"status":200`), 1), 0o600)
	r = kmsctl(t, env, "audit", "verify", "--identity-key-file", idFile, "--export", exp)
	if r.code != exitInvalid || !strings.Contains(r.stdout, "check failed at record") {
		t.Fatalf("tampered export: %d %s", r.code, r.stdout)
	}
	// A wrong identity key.
	other := filepath.Join(dir, "other.pub")
	os.WriteFile(other, []byte(base64.StdEncoding.EncodeToString(make([]byte, 1952))), 0o600)
	if r := kmsctl(t, env, "audit", "verify", "--identity-key-file", other); r.code != exitInvalid || !strings.Contains(r.stdout, "signature") {
		t.Fatalf("wrong identity: %d %s", r.code, r.stdout)
	}
}

func TestHECommands(t *testing.T) {
	url, admin := server(t)
	env := map[string]string{"KMS_ADDR": url, "KMS_TOKEN": admin}
	r := kmsctl(t, env, "keys", "create", "he1", "--kind", "ckks", "--params", "ckks-logn13", "--rotations", "1,2", "--relinearization", "--decrypt-budget", "5")
	if r.code != exitOK || !strings.Contains(r.stdout, `"ckks-logn13"`) || !strings.Contains(r.stdout, `"decrypt_budget": 5`) {
		t.Fatalf("create: %d %s %s", r.code, r.stdout, r.stderr)
	}
	if !strings.Contains(r.stderr, "] 4/4 keys") {
		t.Fatalf("no progress bar on stderr: %q", r.stderr)
	}
	if r := kmsctl(t, env, "keys", "rotate", "he1"); r.code != exitOK || !strings.Contains(r.stdout, `"version": 2`) {
		t.Fatalf("rotate: %d %s %s", r.code, r.stdout, r.stderr)
	}
	lit := filepath.Join(t.TempDir(), "params.json")
	os.WriteFile(lit, []byte(`{"LogN":13,"LogQ":[60,60,60,60],"LogP":[60],"LogDefaultScale":40}`), 0o600)
	if r := kmsctl(t, env, "keys", "create", "he2", "--kind", "ckks", "--params", "@"+lit); r.code != exitRefused || !strings.Contains(r.stderr, "exceeds 218") {
		t.Fatalf("insecure literal: %d %s", r.code, r.stderr)
	}
	if r := kmsctl(t, env, "keys", "create", "he3", "--kind", "bgv", "--params", "bgv-logn13", "--rotations", "one"); r.code != exitUsage {
		t.Fatalf("bad rotations: %d %s", r.code, r.stderr)
	}
	garbage := filepath.Join(t.TempDir(), "ct")
	os.WriteFile(garbage, []byte("garbage"), 0o600)
	if r := kmsctl(t, env, "decrypt", "he1", "--version", "1", "--ciphertext-file", garbage); r.code != exitRefused {
		t.Fatalf("decrypt garbage: %d %s", r.code, r.stderr)
	}
}

// TestHelpMatchesCode: every command is in --help, and every --flag a
// synopsis names is a flag the command defines.
func TestHelpMatchesCode(t *testing.T) {
	r := kmsctl(t, nil, "--help")
	flagRE := regexp.MustCompile(`--([a-z-]+)`)
	for _, c := range commands {
		if !strings.Contains(r.stdout, "  "+c.name) {
			t.Errorf("--help lacks %q", c.name)
		}
		fs := flag.NewFlagSet(c.name, flag.ContinueOnError)
		if c.flags != nil {
			c.flags(fs)
		}
		for _, m := range flagRE.FindAllStringSubmatch(c.synopsis, -1) {
			if fs.Lookup(m[1]) == nil {
				t.Errorf("%s: synopsis names --%s, which the command does not define", c.name, m[1])
			}
		}
		fs.VisitAll(func(f *flag.Flag) {
			if !strings.Contains(c.synopsis, "--"+f.Name) {
				t.Errorf("%s: flag --%s is missing from the synopsis", c.name, f.Name)
			}
		})
	}
}
