package main

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/mlkem"
	crand "crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"flag"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/kmsd-project/kmsd/api/client"
	"github.com/kmsd-project/kmsd/audit"
	"github.com/kmsd-project/kmsd/internal/app"
	"github.com/kmsd-project/kmsd/internal/testhsm"
	"github.com/kmsd-project/kmsd/internal/testutil"
	"github.com/kmsd-project/kmsd/kms"
	"github.com/kmsd-project/kmsd/store/bolt"
)

func TestMain(m *testing.M) { testhsm.Main(m) }

// server starts the real API (audited) over SoftHSM and bbolt on 127.0.0.1
// and returns its URL and an admin token.
func server(t *testing.T) (string, string) {
	url, admin, _ := auditedServer(t)
	return url, admin
}

func auditedServer(t *testing.T) (string, string, *audit.Log) {
	st, err := bolt.Open(filepath.Join(t.TempDir(), "kms.db"), bolt.Options{Sealer: testhsm.Open(t)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	var admin string
	a, err := app.New(context.Background(), app.Config{Store: st, AuditStore: st.Audit(), Sealer: testhsm.Open(t), BlobDir: filepath.Join(t.TempDir(), "blobs"),
		Service:    kms.Config{AsyncKeysetBytes: 1 << 20}, // HE keysets in these tests go to the background
		AdminToken: func(tok string) error { admin = tok; return nil }})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(a.Close)
	// HTTPS with kmsd's TLS configuration; kmsctl trusts the test CA
	// through KMS_CACERT (see kmsctl below).
	srv, caFile := testutil.TLSServer(t, a.Handler())
	testCA = caFile
	return srv.URL, admin, a.Audit
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

// okRunner runs kmsctl with env and fails the test unless it exits 0;
// it returns stdout.
func okRunner(t *testing.T, env map[string]string) func(args ...string) string {
	return func(args ...string) string {
		t.Helper()
		r := kmsctl(t, env, args...)
		if r.code != exitOK {
			t.Fatalf("kmsctl %v: exit %d: %s", args, r.code, r.stderr)
		}
		return r.stdout
	}
}

func TestCommands(t *testing.T) {
	url, admin := server(t)
	env := map[string]string{"KMS_URL": url, "KMS_TOKEN": admin}
	ok := okRunner(t, env)
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
	if len(shown.Versions) != 2 || shown.Versions[0].Version != 3 || shown.Next == "" {
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
	out := filepath.Join(t.TempDir(), "kem.pub")
	if printed := ok("public-key", "kem", "--out", out); printed != "" {
		t.Fatalf("public-key --out also printed %q", printed)
	}
	raw, _ := os.ReadFile(out)
	ek, err := mlkem.NewEncapsulationKey768(raw)
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
	worker := map[string]string{"KMS_URL": url, "KMS_TOKEN": tok.Token}
	for _, c := range []struct {
		env  map[string]string
		args []string
		code int
	}{
		{env, []string{"keys", "show", "nope"}, exitRefused},
		{env, []string{"keys", "create", "Bad", "--kind", "ml-dsa-65"}, exitRefused},
		{worker, []string{"keys", "rotate", "sig"}, exitRefused},
		{map[string]string{"KMS_URL": url}, []string{"keys", "list"}, exitRefused},
		{env, []string{"keys", "show"}, exitUsage},
		{env, []string{"keys", "create", "x"}, exitUsage},
		{env, []string{"versions", "disable", "sig", "one"}, exitUsage},
		{env, []string{"frobnicate"}, exitUsage},
		{env, []string{"keys", "show", "sig", "--bogus"}, exitUsage},
		{env, []string{"sign", "sig", "--message", "***"}, exitUsage},
		{map[string]string{"KMS_URL": "http://127.0.0.1:1"}, []string{"keys", "list"}, exitFailure},
		{env, []string{"--help"}, exitOK},
		{env, []string{"verify", "--help"}, exitOK},
		{env, []string{"sign", "sig", "--message-file", "/nonexistent/msg"}, exitUsage},
		{env, []string{"decrypt", "sig", "--version", "1", "--ciphertext-file", "/nonexistent/ct"}, exitUsage},
		{env, []string{"keys", "list", "-o", "yaml"}, exitUsage},
		{map[string]string{"KMS_URL": "127.0.0.1:8420", "KMS_TOKEN": admin}, []string{"keys", "list"}, exitUsage},
	} {
		if r := kmsctl(t, c.env, c.args...); r.code != c.code {
			t.Errorf("kmsctl %v: exit %d, want %d (%s)", c.args, r.code, c.code, r.stderr)
		}
	}
}

func TestAuditVerifyAndExport(t *testing.T) {
	url, admin, alog := auditedServer(t)
	env := map[string]string{"KMS_URL": url, "KMS_TOKEN": admin}
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
	env := map[string]string{"KMS_URL": url, "KMS_TOKEN": admin}
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
	// he encrypt here (an encryptor token attests the input), he decrypt
	// in kmsd: the slots in use come back. The admin token may not attest.
	dir := t.TempDir()
	in := filepath.Join(dir, "values.json")
	os.WriteFile(in, []byte("[1.5, -2, 3.25]"), 0o600)
	if r := kmsctl(t, env, "he", "encrypt", "--key", "he1", "--in", in, "--cache-dir", filepath.Join(dir, "cache")); r.code != exitRefused || !strings.Contains(r.stderr, "separation of duties") {
		t.Fatalf("he encrypt with an admin token: %d %s %s", r.code, r.stdout, r.stderr)
	}
	r = kmsctl(t, env, "tokens", "create", "--role", "encryptor", "--keys", "he*", "-o", "json")
	var enc struct {
		Token string `json:"token"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &enc); err != nil || enc.Token == "" {
		t.Fatalf("encryptor token: %d %s %s", r.code, r.stdout, r.stderr)
	}
	encEnv := map[string]string{"KMS_URL": url, "KMS_TOKEN": enc.Token}
	// A refusal while fetching the public key is a refusal (exit 3), said
	// as a problem, not as raw JSON.
	if r := kmsctl(t, encEnv, "he", "encrypt", "--key", "he-missing", "--in", in, "--cache-dir", filepath.Join(dir, "cache")); r.code != exitRefused || !strings.Contains(r.stderr, "404") || strings.Contains(r.stderr, `{"type"`) {
		t.Fatalf("he encrypt of a missing key: %d %s", r.code, r.stderr)
	}
	// The key as the argument, as every other command takes it (--key,
	// the older form, is used below).
	r = kmsctl(t, encEnv, "he", "encrypt", "he1", "--in", in, "--cache-dir", filepath.Join(dir, "cache"))
	if r.code != exitOK || strings.Count(r.stdout, "\n") != 1 || !strings.Contains(r.stdout, `"key":"he1","version":2`) || !strings.Contains(r.stdout, `"attestation":{"payload":`) {
		t.Fatalf("he encrypt: %d %s %s", r.code, r.stdout, r.stderr)
	}
	envFile := filepath.Join(dir, "ct.json")
	os.WriteFile(envFile, []byte(r.stdout), 0o600)
	r = kmsctl(t, env, "he", "decrypt", "--in", envFile)
	var got []float64
	if err := json.Unmarshal([]byte(r.stdout), &got); r.code != exitOK || err != nil || len(got) != 3 || got[0] != 1.5 || got[1] != -2 || got[2] != 3.25 {
		t.Fatalf("he decrypt: %d %q %s", r.code, r.stdout, r.stderr)
	}
	// Plain numbers work too; an envelope naming another key is refused by kmsd.
	os.WriteFile(in, []byte("1 2\n3"), 0o600)
	r = kmsctl(t, encEnv, "he", "encrypt", "--key", "he1", "--version", "1", "--in", in, "--cache-dir", filepath.Join(dir, "cache"))
	if r.code != exitOK {
		t.Fatalf("he encrypt --version 1: %d %s", r.code, r.stderr)
	}
	os.WriteFile(envFile, []byte(strings.Replace(r.stdout, `"key":"he1"`, `"key":"he9"`, 1)), 0o600)
	if r := kmsctl(t, env, "he", "decrypt", "--in", envFile); r.code != exitRefused || !strings.Contains(r.stderr, "he9") {
		t.Fatalf("relabelled envelope: %d %s", r.code, r.stderr)
	}
	for _, c := range []struct {
		args []string
		in   string
		want string
	}{
		{[]string{"he", "encrypt", "--in", in}, "1", "kmsctl he encrypt NAME"},
		{[]string{"he", "encrypt", "he1", "--key", "he2", "--in", in}, "1", "give it once"},
		{[]string{"he", "encrypt", "he1", "he2", "--in", in}, "1", "takes"},
		{[]string{"he", "encrypt", "--key", "he1", "--in", in}, "[1, \"x\"]", "not a JSON array of numbers"},
		{[]string{"he", "encrypt", "--key", "he1", "--in", in}, "", "no values"},
		{[]string{"he", "decrypt", "--in", in}, "{\"key\":\"he1\"}", "needs key, version"},
		{[]string{"he", "decrypt", "--in", "/nonexistent/ct.json"}, "", "--in"},
	} {
		os.WriteFile(in, []byte(c.in), 0o600)
		if r := kmsctl(t, env, c.args...); r.code != exitUsage || !strings.Contains(r.stderr, c.want) {
			t.Errorf("kmsctl %v with %q: %d %s", c.args, c.in, r.code, r.stderr)
		}
	}
}

// TestHelpMatchesCode: every command is in --help, and every --flag a
// synopsis names is a flag the command defines.
func TestHelpMatchesCode(t *testing.T) {
	r := kmsctl(t, nil, "--help")
	flagRE := regexp.MustCompile(`--([a-z0-9-]+)`)
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

// TestHelpAndGlobalFlags: groups and commands have their own help, global
// flags work after the command, and KMS_ADDR (kmsd's) is not read.
// TestBashCompletion: the script kmsctl completion bash prints completes
// groups and a group's commands in a real bash.
func TestBashCompletion(t *testing.T) {
	r := kmsctl(t, nil, "completion", "bash")
	if r.code != exitOK {
		t.Fatalf("completion bash: %d %s", r.code, r.stderr)
	}
	script := r.stdout + `
COMP_WORDS=(kmsctl key); COMP_CWORD=1; _kmsctl; echo "${COMPREPLY[*]}"
COMP_WORDS=(kmsctl keys ro); COMP_CWORD=2; _kmsctl; echo "${COMPREPLY[*]}"
COMP_WORDS=(kmsctl audit ""); COMP_CWORD=2; _kmsctl; echo "${COMPREPLY[*]}"
`
	out, err := exec.Command("bash", "-c", script).CombinedOutput()
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	if err != nil || len(lines) != 3 || lines[0] != "keys" || lines[1] != "rotate" || !strings.Contains(lines[2], "inclusion-proof") {
		t.Fatalf("bash completion: %v %q", err, out)
	}
}

func TestHelpAndGlobalFlags(t *testing.T) {
	url, admin := server(t)
	for _, c := range []struct {
		args       []string
		code       int
		stdout     string
		stderr     string
		notInStdin string
	}{
		{[]string{"keys", "--help"}, exitOK, "keys create NAME", "", "tokens create"},
		{[]string{"help", "keys"}, exitOK, "keys rotate NAME", "", "tokens create"},
		{[]string{"keys"}, exitUsage, "", "keys list", ""},
		{[]string{"keys", "frobnicate"}, exitUsage, "", `unknown command "keys frobnicate"`, ""},
		{[]string{"help", "keys", "create"}, exitOK, "--url URL", "", ""},
		{[]string{"keys", "create", "--help"}, exitOK, "--kind STRING", "", "tokens create"},
		{[]string{"key", "list"}, exitUsage, "", `(did you mean "kmsctl keys list"?)`, ""},
		{[]string{"keys", "lst"}, exitUsage, "", `(did you mean "kmsctl keys list"?)`, ""},
		{[]string{"rotate", "k"}, exitUsage, "", `(did you mean "kmsctl keys rotate"?)`, ""},
		{[]string{"frobnicate"}, exitUsage, "", `unknown command "frobnicate"; run`, ""},
		{[]string{"completion", "fish"}, exitOK, "__fish_seen_subcommand_from keys", "", ""},
		{[]string{"completion", "tcsh"}, exitUsage, "", "want bash, zsh or fish", ""},
		{[]string{"audit", "--help"}, exitOK, "audit inclusion-proof", "", ""},
	} {
		r := kmsctl(t, nil, c.args...)
		if r.code != c.code || !strings.Contains(r.stdout, c.stdout) || !strings.Contains(r.stderr, c.stderr) || (c.notInStdin != "" && strings.Contains(r.stdout, c.notInStdin)) {
			t.Errorf("kmsctl %v: exit %d, stdout %q, stderr %q", c.args, r.code, r.stdout, r.stderr)
		}
	}
	// Global flags after the command and its arguments.
	if r := kmsctl(t, nil, "keys", "create", "late", "--kind", "ml-dsa-44", "--url", url, "--token", admin, "--ca-cert", testCA); r.code != exitOK {
		t.Fatalf("global flags after the command: %d %s", r.code, r.stderr)
	}
	// kmsd's KMS_ADDR is not the client's URL: kmsctl says so and uses KMS_URL.
	r := kmsctl(t, map[string]string{"KMS_ADDR": "127.0.0.1:1", "KMS_TOKEN": admin}, "keys", "list", "--url", url)
	if r.code != exitOK || strings.Contains(r.stderr, "KMS_ADDR") {
		t.Fatalf("--url with KMS_ADDR set: %d %s", r.code, r.stderr)
	}
	r = kmsctl(t, map[string]string{"KMS_ADDR": "127.0.0.1:1", "KMS_TOKEN": admin}, "keys", "list")
	if !strings.Contains(r.stderr, "set KMS_URL") {
		t.Fatalf("KMS_ADDR without KMS_URL: no hint: %q", r.stderr)
	}
	// Written as a URL already, it is not prefixed again.
	r = kmsctl(t, map[string]string{"KMS_ADDR": "https://127.0.0.1:1", "KMS_TOKEN": admin}, "keys", "list")
	if !strings.Contains(r.stderr, "set KMS_URL (for example https://127.0.0.1:1)") || strings.Contains(r.stderr, "https://https://") {
		t.Fatalf("KMS_ADDR as a URL: %q", r.stderr)
	}
	// Output: JSON when not a terminal, tables on request.
	env := map[string]string{"KMS_URL": url, "KMS_TOKEN": admin}
	if r := kmsctl(t, env, "keys", "list"); !json.Valid([]byte(r.stdout)) {
		t.Fatalf("keys list to a pipe is not JSON: %s", r.stdout)
	}
	r = kmsctl(t, env, "keys", "list", "-o", "table")
	lines := strings.Split(strings.TrimSpace(r.stdout), "\n")
	if r.code != exitOK || len(lines) != 2 || !regexp.MustCompile(`^NAME\s+KIND\s+POLICY`).MatchString(lines[0]) || !strings.HasPrefix(lines[1], "late ") {
		t.Fatalf("keys list -o table: %d %q", r.code, r.stdout)
	}
	r = kmsctl(t, env, "keys", "show", "late", "--output", "table")
	if !regexp.MustCompile(`(?m)^LATEST_VERSION\s+1$`).MatchString(r.stdout) || !regexp.MustCompile(`(?m)^VERSIONS:\nNAME\s+VERSION\s+STATE`).MatchString(r.stdout) {
		t.Fatalf("keys show -o table: %q", r.stdout)
	}
}

// TestMoreCommands: operations, the audit log's parts, encapsulation to a
// served key, HE key fetches that resume, and policy updates that change
// only what is given.
func TestMoreCommands(t *testing.T) {
	url, admin, alog := auditedServer(t)
	env := map[string]string{"KMS_URL": url, "KMS_TOKEN": admin}
	ok := okRunner(t, env)
	// Encapsulate here, decapsulate there: the same secret.
	ok("keys", "create", "kem", "--kind", "ml-kem-768")
	var enc struct {
		Version      int    `json:"version"`
		Ciphertext   string `json:"ciphertext"`
		SharedSecret []byte `json:"shared_secret"`
	}
	json.Unmarshal([]byte(ok("encapsulate", "kem")), &enc)
	var dec struct {
		SharedSecret []byte `json:"shared_secret"`
	}
	json.Unmarshal([]byte(ok("decapsulate", "kem", "--version", "1", "--ciphertext", enc.Ciphertext)), &dec)
	if enc.Version != 1 || len(enc.SharedSecret) != 32 || !bytes.Equal(dec.SharedSecret, enc.SharedSecret) {
		t.Fatalf("encapsulate/decapsulate: %+v vs %x", enc, dec.SharedSecret)
	}
	ssFile := filepath.Join(t.TempDir(), "ss")
	if out := ok("encapsulate", "kem", "--shared-secret-file", ssFile); strings.Contains(out, "shared_secret") {
		t.Fatalf("--shared-secret-file still printed the secret: %s", out)
	}
	if fi, err := os.Stat(ssFile); err != nil || fi.Size() != 32 || fi.Mode().Perm() != 0o600 {
		t.Fatalf("shared secret file: %v %v", fi, err)
	}
	ok("keys", "create", "sig", "--kind", "ml-dsa-44")
	if r := kmsctl(t, env, "encapsulate", "sig"); r.code != exitUsage || !strings.Contains(r.stderr, "needs an ML-KEM key") {
		t.Fatalf("encapsulate to a signing key: %d %s", r.code, r.stderr)
	}

	// Policy updates change only the flags given; a zero value resets.
	ok("keys", "create", "he", "--kind", "ckks", "--params", "ckks-logn13", "--rotations", "1", "--relinearization", "--decrypt-budget", "5")
	var k struct {
		Policy map[string]any `json:"policy"`
	}
	json.Unmarshal([]byte(ok("keys", "update", "he", "--decrypt-budget", "4")), &k)
	if k.Policy["decrypt_budget"] != 4.0 || k.Policy["relinearization"] != true || k.Policy["params"] != "ckks-logn13" || fmt.Sprint(k.Policy["rotations"]) != "[1]" {
		t.Fatalf("update --decrypt-budget changed more: %v", k.Policy)
	}
	k.Policy = nil
	json.Unmarshal([]byte(ok("keys", "update", "he", "--relinearization=false")), &k)
	if _, on := k.Policy["relinearization"]; on || k.Policy["decrypt_budget"] != 4.0 {
		t.Fatalf("update --relinearization=false: %v", k.Policy)
	}

	// HE keys to a directory: every blob checked, a second run keeps them,
	// a partial one resumes.
	dir, idFile := t.TempDir(), filepath.Join(t.TempDir(), "id.pub")
	r := kmsctl(t, env, "he", "fetch", "he", "--dir", dir, "--identity-key-file", idFile, "--fetch-identity")
	if r.code != exitOK || !strings.Contains(r.stderr, "] ") || !strings.Contains(r.stdout, `"blobs": 3`) {
		t.Fatalf("he fetch: %d %s %s", r.code, r.stdout, r.stderr)
	}
	blobs, _ := filepath.Glob(filepath.Join(dir, "[0-9a-f]*"))
	if len(blobs) != 3 {
		t.Fatalf("he fetch wrote %v", blobs)
	}
	for _, b := range blobs {
		data, _ := os.ReadFile(b)
		if sum := sha256.Sum256(data); hex.EncodeToString(sum[:]) != filepath.Base(b) {
			t.Fatalf("%s does not hash to its name", b)
		}
	}
	data, _ := os.ReadFile(blobs[0])
	os.Remove(blobs[0])
	os.WriteFile(blobs[0]+".part", data[:len(data)/2], 0o600)
	if r := kmsctl(t, env, "he", "fetch", "he", "--version", "1", "--dir", dir, "--identity-key-file", idFile); r.code != exitOK {
		t.Fatalf("he fetch resume: %d %s", r.code, r.stderr)
	}
	if again, _ := os.ReadFile(blobs[0]); !bytes.Equal(again, data) {
		t.Fatal("the resumed blob differs")
	}
	other := filepath.Join(t.TempDir(), "other.pub")
	os.WriteFile(other, []byte(base64.StdEncoding.EncodeToString(make([]byte, 1952))), 0o600)
	if r := kmsctl(t, env, "he", "fetch", "he", "--dir", t.TempDir(), "--identity-key-file", other); r.code != exitFailure || !strings.Contains(r.stderr, "not signed by the pinned identity key") {
		t.Fatalf("he fetch with another identity: %d %s", r.code, r.stderr)
	}
	// The HE public key to a file: the blob's bytes, nothing printed.
	pkFile := filepath.Join(t.TempDir(), "pk.bin")
	if r := kmsctl(t, env, "public-key", "he", "--out", pkFile); r.code != exitOK || r.stdout != "" {
		t.Fatalf("public-key --out of an HE key: %d %q %s", r.code, r.stdout, r.stderr)
	}
	if fi, err := os.Stat(pkFile); err != nil || fi.Size() == 0 {
		t.Fatalf("HE public key file: %v %v", fi, err)
	}
	// It is the full form (a seeded key is expanded by kmsd), as the
	// public-key endpoint names it.
	{
		tlsCfg, _ := client.TLSConfig(testCA, "", "")
		c, _ := client.New(url, admin, client.WithTLS(tlsCfg))
		pk, err := c.PublicKey(context.Background(), "he", 0)
		b, _ := os.ReadFile(pkFile)
		sum := sha256.Sum256(b)
		if err != nil || "sha256:"+hex.EncodeToString(sum[:]) != pk.Digest || !strings.HasSuffix(pk.URL, "?form=full") {
			t.Fatalf("HE public key file: not the full form the endpoint names (%+v, %v)", pk, err)
		}
	}

	// Operations: a rotation in the background, shown and waited for.
	r = kmsctl(t, env, "keys", "rotate", "he")
	if r.code != exitOK {
		t.Fatalf("rotate: %d %s", r.code, r.stderr)
	}
	tlsCfg, _ := client.TLSConfig(testCA, "", "")
	c, _ := client.New(url, admin, client.WithTLS(tlsCfg))
	_, op, err := c.RotateOrOperation(context.Background(), "he")
	if err != nil || op == nil {
		t.Fatalf("rotate through the SDK: %v %v", op, err)
	}
	r = kmsctl(t, env, "operations", "wait", op.ID)
	if r.code != exitOK || !strings.Contains(r.stdout, `"state": "succeeded"`) || !strings.Contains(r.stdout, `"version": 3`) {
		t.Fatalf("operations wait: %d %s %s", r.code, r.stdout, r.stderr)
	}
	if r := kmsctl(t, env, "operations", "show", op.ID); r.code != exitOK || !strings.Contains(r.stdout, `"succeeded"`) {
		t.Fatalf("operations show: %d %s", r.code, r.stdout)
	}
	if r := kmsctl(t, env, "operations", "show", "op_nonexistent"); r.code != exitRefused {
		t.Fatalf("operations show of an unknown id: %d %s", r.code, r.stderr)
	}

	// The audit log's parts.
	alog.Checkpoint(context.Background())
	note := ok("audit", "checkpoint")
	size, err := checkpointSize([]byte(note))
	if err != nil || size < 5 {
		t.Fatalf("audit checkpoint: %v %q", err, note)
	}
	recs := strings.Split(strings.TrimSpace(ok("audit", "records", "--start", "0", "--end", "3")), "\n")
	if len(recs) != 3 || !json.Valid([]byte(recs[2])) || !strings.Contains(recs[2], `"index":2`) {
		t.Fatalf("audit records: %q", recs)
	}
	// -o table is a table (it printed JSON before).
	rows := strings.Split(strings.TrimSpace(ok("audit", "records", "--start", "0", "--end", "3", "-o", "table")), "\n")
	if len(rows) != 4 || !regexp.MustCompile(`^INDEX\s+TIME\s+ACTOR`).MatchString(rows[0]) || !strings.HasPrefix(rows[3], "2 ") || json.Valid([]byte(rows[3])) {
		t.Fatalf("audit records -o table: %q", rows)
	}
	// Every field the API returns, the index and the old size included.
	var proof struct {
		Index *uint64  `json:"index"`
		Old   *uint64  `json:"old"`
		Size  uint64   `json:"size"`
		Proof [][]byte `json:"proof"`
	}
	json.Unmarshal([]byte(ok("audit", "inclusion-proof", "--index", "2", "--size", fmt.Sprint(size))), &proof)
	if proof.Size != size || len(proof.Proof) == 0 || proof.Index == nil || *proof.Index != 2 {
		t.Fatalf("inclusion-proof: %+v", proof)
	}
	proof.Index = nil
	json.Unmarshal([]byte(ok("audit", "consistency-proof", "--old", "3", "--size", fmt.Sprint(size))), &proof)
	if len(proof.Proof) == 0 || proof.Old == nil || *proof.Old != 3 || proof.Index != nil {
		t.Fatalf("consistency-proof: %+v", proof)
	}
	if r := kmsctl(t, env, "audit", "records", "--start", "3", "--end", "3"); r.code != exitUsage {
		t.Fatalf("audit records with an empty range: %d", r.code)
	}
}

// TestFirstRunHints: the failures of a first run say which flag or
// variable fixes them: an untrusted CA, plain HTTP against kmsd's HTTPS,
// and no token.
func TestFirstRunHints(t *testing.T) {
	url, admin := server(t)
	otherCA := filepath.Join(t.TempDir(), "other-ca.pem")
	key, _ := ecdsa.GenerateKey(elliptic.P256(), crand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "another CA"}, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(crand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(otherCA, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600)
	for _, c := range []struct {
		name string
		env  map[string]string
		code int
		want string
	}{
		{"another CA", map[string]string{"KMS_URL": url, "KMS_TOKEN": admin, "KMS_CACERT": otherCA}, exitFailure, "--ca-cert FILE or KMS_CA_CERT"},
		// KMS_CA_CERT (the flag's name) wins over KMS_CACERT (its older
		// name, set here to the right CA).
		{"another CA by its new name", map[string]string{"KMS_URL": url, "KMS_TOKEN": admin, "KMS_CA_CERT": otherCA}, exitFailure, "--ca-cert FILE or KMS_CA_CERT"},
		{"http to the HTTPS port", map[string]string{"KMS_URL": "http://" + strings.TrimPrefix(url, "https://"), "KMS_TOKEN": admin}, exitRefused, "use https:// in --url/KMS_URL"},
		{"no token", map[string]string{"KMS_URL": url}, exitRefused, "--token, KMS_TOKEN, --token-file or KMS_TOKEN_FILE"},
	} {
		r := kmsctl(t, c.env, "keys", "list")
		if r.code != c.code || !strings.Contains(r.stderr, c.want) {
			t.Errorf("%s: exit %d, %q; want exit %d naming %q", c.name, r.code, r.stderr, c.code, c.want)
		}
	}
}

// TestTimeoutFromEnvironment: KMS_TIMEOUT is --timeout's variable; a
// value that is not a duration is refused naming it, not ignored.
func TestTimeoutFromEnvironment(t *testing.T) {
	r := kmsctl(t, map[string]string{"KMS_URL": "https://127.0.0.1:1", "KMS_TIMEOUT": "soon"}, "keys", "list")
	if r.code != exitUsage || !strings.Contains(r.stderr, "KMS_TIMEOUT") {
		t.Fatalf("KMS_TIMEOUT=soon: exit %d, %q", r.code, r.stderr)
	}
	// A short timeout applies: a server that never answers fails fast.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	start := time.Now()
	_, caFile := testutil.TLSServer(t, http.NotFoundHandler()) // a CA file; its server is not the one called
	r = kmsctl(t, map[string]string{"KMS_URL": "https://" + ln.Addr().String(), "KMS_TOKEN": "x", "KMS_TIMEOUT": "300ms", "KMS_CA_CERT": caFile}, "keys", "list")
	if r.code == exitOK || time.Since(start) > 20*time.Second {
		t.Fatalf("KMS_TIMEOUT=300ms against a silent server: exit %d after %v", r.code, time.Since(start))
	}
	if !strings.Contains(r.stderr, "deadline") && !strings.Contains(r.stderr, "timeout") && !strings.Contains(r.stderr, "Timeout") {
		t.Fatalf("KMS_TIMEOUT=300ms: %q does not say it timed out", r.stderr)
	}
}

// TestVersion: kmsctl version needs no server and names the build.
func TestVersion(t *testing.T) {
	r := kmsctl(t, map[string]string{"KMS_URL": "https://127.0.0.1:1"}, "version")
	if r.code != exitOK || !strings.HasPrefix(r.stdout, "kmsctl ") || !strings.Contains(r.stdout, "commit ") || !strings.Contains(r.stdout, "go1.") {
		t.Fatalf("kmsctl version: %d %q %q", r.code, r.stdout, r.stderr)
	}
}

// TestRotationPeriodFlag: keys create and keys update take
// --rotation-period, keys show prints next_rotation_time (JSON and table),
// an empty --rotation-period turns it off, and a period the server refuses
// is a 400 with its reason.
func TestRotationPeriodFlag(t *testing.T) {
	url, admin := server(t)
	env := map[string]string{"KMS_URL": url, "KMS_TOKEN": admin}
	ok := okRunner(t, env)
	ok("keys", "create", "rot", "--kind", "ml-dsa-65", "--rotation-period", "720h")
	var k struct {
		Policy struct {
			RotationPeriod string `json:"rotation_period"`
		} `json:"policy"`
		Next *time.Time `json:"next_rotation_time"`
	}
	json.Unmarshal([]byte(ok("keys", "show", "rot")), &k)
	if k.Policy.RotationPeriod != "720h" || k.Next == nil || time.Until(*k.Next) < 719*time.Hour {
		t.Fatalf("keys show after --rotation-period 720h: %+v", k)
	}
	if out := ok("keys", "show", "rot", "-o", "table"); !strings.Contains(out, "NEXT_ROTATION_TIME") {
		t.Fatalf("the table lacks next_rotation_time:\n%s", out)
	}
	ok("keys", "update", "rot", "--rotation-period", "48h")
	json.Unmarshal([]byte(ok("keys", "show", "rot")), &k)
	if k.Policy.RotationPeriod != "48h" || time.Until(*k.Next) > 48*time.Hour {
		t.Fatalf("after --rotation-period 48h: %+v", k)
	}
	k.Next, k.Policy.RotationPeriod = nil, ""
	json.Unmarshal([]byte(ok("keys", "update", "rot", "--rotation-period", "")), &k)
	if k.Policy.RotationPeriod != "" || k.Next != nil {
		t.Fatalf("after --rotation-period \"\": %+v", k)
	}
	if r := kmsctl(t, env, "keys", "update", "rot", "--rotation-period", "5m"); r.code == exitOK || !strings.Contains(r.stderr, "below this server's minimum of 1h") {
		t.Fatalf("--rotation-period 5m: exit %d %s", r.code, r.stderr)
	}
}
