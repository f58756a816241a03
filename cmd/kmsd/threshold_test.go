package main

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"io"
	"math"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cloudflare/circl/sign/mldsa/mldsa65"
	"github.com/modelcontextprotocol/go-sdk/mcp"

	"github.com/kmsd-project/kmsd/api"
	"github.com/kmsd-project/kmsd/api/client"
	"github.com/kmsd-project/kmsd/api/client/hekeys"
	"github.com/kmsd-project/kmsd/kms"
)

// node is one kmsd of a threshold test: its own data dir, SoftHSM token
// (made under the data dir), admin token and identity key.
type node struct {
	name, dir, addr string
	p               *proc
	identity        []byte
	admin           *client.Client
}

// thresholdNodes starts n kmsd nodes that know each other as peers: each
// starts once alone (it makes its data dir, token, TLS CA and identity),
// then again with a --peers file naming the others.
func thresholdNodes(t testing.TB, names ...string) []*node {
	t.Helper()
	var nodes []*node
	for _, name := range names {
		n := &node{name: name, dir: filepath.Join(t.TempDir(), name), addr: freeAddr(t)}
		p := startAt(t, n.dir, n.addr, nil)
		p.waitReady(t)
		n.identity = p.identity(t)
		p.cmd.Process.Signal(syscall.SIGTERM)
		p.wait(t, 20*time.Second)
		nodes = append(nodes, n)
	}
	for _, n := range nodes {
		cfg := api.PeerConfig{Self: n.name}
		for _, o := range nodes {
			if o != n {
				cfg.Peers = append(cfg.Peers, api.PeerInfo{Name: o.name, URL: "https://" + o.addr, Identity: base64.StdEncoding.EncodeToString(o.identity), CACert: filepath.Join(o.dir, "tls", "ca.pem")})
			}
		}
		b, _ := json.Marshal(cfg)
		file := filepath.Join(t.TempDir(), "peers.json")
		if err := os.WriteFile(file, b, 0o600); err != nil {
			t.Fatal(err)
		}
		n.p = startAt(t, n.dir, n.addr, nil, "--peers", file)
	}
	for _, n := range nodes {
		n.p.waitReady(t)
		tok, err := os.ReadFile(filepath.Join(n.dir, "admin.token"))
		if err != nil {
			t.Fatal(err)
		}
		if n.admin, err = n.p.client(t, strings.TrimSpace(string(tok))); err != nil {
			t.Fatal(err)
		}
	}
	return nodes
}

func (n *node) token(t testing.TB, role string, keys ...string) string {
	t.Helper()
	tok, err := n.admin.CreateToken(context.Background(), client.CreateTokenRequest{Role: role, Keys: keys})
	if err != nil {
		t.Fatal(err)
	}
	return tok.Token
}

func (n *node) client(t testing.TB, token string) *client.Client {
	t.Helper()
	c, err := n.p.client(t, token)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// TestThresholdKeyAcrossThreeNodes: three kmsd processes, each with its own
// data dir, SoftHSM token and admin, make a CKKS key jointly (t = 2): each
// serves the same manifest and keys, and audits each step of the setup
// under the same run id. Two data owners' ciphertexts are summed by
// kmsd-mcp (which needs no change: the keys are served as any key's);
// the sum is decrypted by two nodes for a requester that alone sees the
// plaintext. With one node left, the decryption is refused naming the
// missing ones; no node decrypts alone.
func TestThresholdKeyAcrossThreeNodes(t *testing.T) {
	ctx := context.Background()
	nodes := thresholdNodes(t, "node-a", "node-b", "node-c")
	a := nodes[0]
	created, err := a.admin.CreateKey(ctx, client.CreateKeyRequest{Name: "joint", Kind: "ckks", Policy: &client.Policy{Params: json.RawMessage(`"ckks-logn13"`), Relinearization: true, DecryptBudget: 16,
		Threshold: &client.ThresholdPolicy{Parties: []string{"node-a", "node-b", "node-c"}, T: 2}}})
	if err != nil {
		t.Fatal(err)
	}
	if created.LatestVersion != 1 || created.Policy.Threshold == nil || created.Policy.Threshold.T != 2 {
		t.Fatalf("created: %+v", created)
	}
	// Every node holds version 1 with the same manifest.
	var manifests []string
	for _, n := range nodes {
		manifests = append(manifests, string(n.get(t, "/v1/keys/joint/versions/1/evaluation-keys")))
	}
	if manifests[0] != manifests[1] || manifests[1] != manifests[2] || !strings.Contains(manifests[0], `"threshold":{"parties":["node-a","node-b","node-c"],"t":2}`) {
		t.Fatalf("the nodes' manifests differ or name no threshold:\n%s\n%s\n%s", manifests[0], manifests[1], manifests[2])
	}
	// The same run id in every node's audit log.
	run := ""
	for _, n := range nodes {
		var runs []string
		// The records are read up to the latest checkpoint: wait for one
		// that covers the setup.
		for deadline := time.Now().Add(15 * time.Second); len(runs) == 0 && time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
			for _, r := range auditRecords(t, n.admin) {
				if r.Run != "" && r.Key == "joint" {
					runs = append(runs, r.Run)
				}
			}
		}
		if len(runs) == 0 {
			t.Fatalf("%s: no audit record names the setup's run", n.name)
		}
		if run == "" {
			run = runs[0]
		}
		if !slices.Contains(runs, run) {
			t.Fatalf("%s: the run ids %v, not %s", n.name, runs, run)
		}
	}
	// Two data owners encrypt at node a (its encryptor tokens attest).
	fetchKey := func(n *node, name string) *hekeys.Keys {
		f := &hekeys.Fetcher{BaseURL: n.p.url(), Token: n.token(t, "worker", name), IdentityKey: n.identity, CacheDir: t.TempDir(), HTTP: n.client(t, "").HTTPClient()}
		k, err := f.Fetch(ctx, name, 0)
		if err != nil {
			t.Fatal(err)
		}
		return k
	}
	fetch := func(n *node) *hekeys.Keys { return fetchKey(n, "joint") }
	keys := fetch(a)
	if kb := fetch(nodes[1]); !kb.PublicKey.Equal(keys.PublicKey) {
		t.Fatal("node b serves another public key")
	}
	enc := a.client(t, a.token(t, "encryptor", "joint"))
	x, y := []float64{1.5, -2, 0.25}, []float64{0.5, 1, 3}
	var envs []*client.Envelope
	for _, v := range [][]float64{x, y} {
		env, err := keys.Encrypt(v)
		if err != nil {
			t.Fatal(err)
		}
		if err := hekeys.AttestInput(ctx, enc, env); err != nil {
			t.Fatal(err)
		}
		envs = append(envs, env)
	}
	// kmsd-mcp (stdio) sums them with node a's evaluator token.
	mcpDir := t.TempDir()
	os.WriteFile(filepath.Join(mcpDir, "token"), []byte(a.token(t, "evaluator", "joint")), 0o600)
	os.WriteFile(filepath.Join(mcpDir, "identity.pub"), []byte(base64.StdEncoding.EncodeToString(a.identity)), 0o600)
	cmd := exec.Command(mcpBin, "--kms-url", a.p.url(), "--ca-cert", filepath.Join(a.dir, "tls", "ca.pem"), "--token-file", filepath.Join(mcpDir, "token"),
		"--identity-key-file", filepath.Join(mcpDir, "identity.pub"), "--key", "joint", "--cache-dir", filepath.Join(mcpDir, "cache"))
	var session *mcp.ClientSession
	session, err = mcp.NewClient(&mcp.Implementation{Name: "test", Version: "1"}, nil).Connect(ctx, &mcp.CommandTransport{Command: cmd}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer session.Close()
	var args []any
	for _, e := range envs {
		b, _ := json.Marshal(e)
		var m map[string]any
		json.Unmarshal(b, &m)
		args = append(args, m)
	}
	res, err := session.CallTool(ctx, &mcp.CallToolParams{Name: "he_aggregate", Arguments: map[string]any{"ciphertexts": args, "op": "sum"}})
	if err != nil || res.IsError {
		t.Fatalf("he_aggregate: %v %+v", err, res)
	}
	b, _ := json.Marshal(res.StructuredContent)
	var out struct {
		Ciphertext json.RawMessage `json:"ciphertext"`
	}
	json.Unmarshal(b, &out)
	sum, err := hekeys.ParseEnvelope(out.Ciphertext)
	if err != nil {
		t.Fatal(err)
	}
	// No node decrypts alone: plain decryption is refused.
	dec := a.client(t, a.token(t, "decryptor", "joint"))
	if _, err := dec.Decrypt(ctx, sum); err == nil || !strings.Contains(err.Error(), "threshold key") {
		t.Fatalf("plain decryption of a threshold key: %v", err)
	}
	// Two nodes decrypt for the requester.
	pt, err := hekeys.ThresholdDecrypt(ctx, dec, keys, sum)
	if err != nil {
		t.Fatal(err)
	}
	if len(pt.Values) != 3 || len(pt.Parties) != 2 || pt.Parties[0] != "node-a" {
		t.Fatalf("threshold decryption: %+v", pt)
	}
	for i := range x {
		if math.Abs(pt.Values[i]-(x[i]+y[i])) > math.Ldexp(1, -min(pt.Precision, 10)) {
			t.Fatalf("slot %d: %f, want %f (precision %d bits)", i, pt.Values[i], x[i]+y[i], pt.Precision)
		}
	}
	t.Logf("decrypted by %v with %d bits of precision", pt.Parties, pt.Precision)
	// The decryption is in both answering nodes' audit logs under one run
	// id (the partial at node b, the request at node a).
	decRuns := map[string]int{}
	for _, n := range nodes[:2] {
		for deadline := time.Now().Add(15 * time.Second); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
			found := false
			for _, r := range auditRecords(t, n.admin) {
				if r.Run != "" && r.Run != run && r.Key == "joint" && r.Version == 1 && r.Status == 200 && (strings.HasSuffix(r.Operation, "/threshold-decrypt") || strings.HasSuffix(r.Operation, "/v1/peer/{op}")) {
					decRuns[r.Run]++
					found = true
				}
			}
			if found {
				break
			}
		}
	}
	if len(decRuns) != 1 {
		t.Fatalf("the decryption's run ids in nodes a and b: %v, want one in both", decRuns)
	}
	// A key whose policy names its requesters: every party decrypts only
	// a request one of them signed, over this ciphertext and this target
	// key (a node alone, coordinating, cannot ask).
	rpub, rpriv, _ := mldsa65.GenerateKey(nil)
	_, other, _ := mldsa65.GenerateKey(nil)
	rb, _ := rpub.MarshalBinary()
	if _, err := a.admin.CreateKey(ctx, client.CreateKeyRequest{Name: "signed", Kind: "ckks", Policy: &client.Policy{Params: json.RawMessage(`"ckks-logn13"`), DecryptBudget: 16,
		Threshold: &client.ThresholdPolicy{Parties: []string{"node-a", "node-b", "node-c"}, T: 2, Requesters: []string{base64.StdEncoding.EncodeToString(rb)}}}}); err != nil {
		t.Fatal(err)
	}
	skeys := fetchKey(nodes[1], "signed")
	senv, err := skeys.Encrypt([]float64{4, 5})
	if err != nil {
		t.Fatal(err)
	}
	if err := hekeys.AttestInput(ctx, a.client(t, a.token(t, "encryptor", "signed")), senv); err != nil {
		t.Fatal(err)
	}
	sdec := a.client(t, a.token(t, "decryptor", "signed"))
	if _, err := hekeys.ThresholdDecrypt(ctx, sdec, skeys, senv); err == nil || !strings.Contains(err.Error(), "party node-b") || !strings.Contains(err.Error(), "requesters") {
		t.Fatalf("an unsigned request: %v", err)
	}
	if _, err := hekeys.ThresholdDecryptAs(ctx, sdec, skeys, senv, other, 0); err == nil || !strings.Contains(err.Error(), "not signed by requester 0") {
		t.Fatalf("a request signed by another key: %v", err)
	}
	if pt, err := hekeys.ThresholdDecryptAs(ctx, sdec, skeys, senv, rpriv, 0); err != nil || math.Abs(pt.Values[1]-5) > 0.01 {
		t.Fatalf("a signed request: %+v %v", pt, err)
	}
	// Policies a node refuses before any party is asked.
	for _, c := range []struct {
		tp   *client.ThresholdPolicy
		says string
	}{
		{&client.ThresholdPolicy{Parties: []string{"node-a", "node-b", "node-c"}, T: 1}, "threshold.t must be from 2"},
		{&client.ThresholdPolicy{Parties: []string{"node-a", "node-b", "node-c"}, T: 4}, "threshold.t must be from 2"},
		{&client.ThresholdPolicy{Parties: []string{"node-b", "node-c"}, T: 2}, "must include this node"},
		{&client.ThresholdPolicy{Parties: []string{"node-a", "node-x"}, T: 2}, "not a configured peer"},
		{&client.ThresholdPolicy{Parties: []string{"node-a", "node-b", "node-b"}, T: 2}, "twice"},
	} {
		_, err := a.admin.CreateKey(ctx, client.CreateKeyRequest{Name: "bad", Kind: "ckks", Policy: &client.Policy{Params: json.RawMessage(`"ckks-logn13"`), Threshold: c.tp}})
		if err == nil || !strings.Contains(err.Error(), c.says) {
			t.Errorf("threshold %+v: %v, want %q", c.tp, err, c.says)
		}
	}
	for _, n := range nodes {
		if _, err := n.admin.GetKey(ctx, "bad"); err == nil {
			t.Fatalf("a refused threshold key exists at %s", n.name)
		}
	}
	// The policy's threshold does not change; the key does not rotate by
	// itself, nor gain keys on demand.
	if _, err := a.admin.UpdateKey(ctx, "joint", client.UpdateKeyRequest{Policy: &client.Policy{Threshold: &client.ThresholdPolicy{Parties: []string{"node-a", "node-b"}, T: 2}}}); err == nil || !strings.Contains(err.Error(), "never changes") {
		t.Errorf("changing the threshold: %v", err)
	}
	if _, _, err := a.admin.GaloisKeys(ctx, "joint", 1, client.GaloisKeysRequest{Rotations: []int{1}}); err == nil || !strings.Contains(err.Error(), "threshold key") {
		t.Errorf("Galois keys on demand: %v", err)
	}
	// Rotation at node b: a new setup; every node has version 2 with the
	// same manifest, and it decrypts.
	if _, err := nodes[1].admin.Rotate(ctx, "joint"); err != nil {
		t.Fatal(err)
	}
	var m2 []string
	for _, n := range nodes {
		m2 = append(m2, string(n.get(t, "/v1/keys/joint/versions/2/evaluation-keys")))
	}
	if m2[0] != m2[1] || m2[1] != m2[2] || m2[0] == manifests[0] {
		t.Fatal("version 2's manifests differ between nodes, or equal version 1's")
	}
	keys2 := fetch(nodes[2])
	env2, err := keys2.Encrypt([]float64{7})
	if err != nil {
		t.Fatal(err)
	}
	if err := hekeys.AttestInput(ctx, enc, env2); err != nil {
		t.Fatal(err)
	}
	if pt, err := hekeys.ThresholdDecrypt(ctx, dec, keys2, env2); err != nil || math.Abs(pt.Values[0]-7) > 0.01 {
		t.Fatalf("version 2: %+v %v", pt, err)
	}
	// Node c down: a and b still decrypt; node b down too: refused,
	// naming both.
	nodes[2].p.cmd.Process.Kill()
	<-nodes[2].p.done
	nodes[2].p.done <- nil
	if pt, err = hekeys.ThresholdDecrypt(ctx, dec, keys, sum); err != nil || !slices.Equal(pt.Parties, []string{"node-a", "node-b"}) {
		t.Fatalf("with node c down: %+v %v", pt, err)
	}
	nodes[1].p.cmd.Process.Kill()
	<-nodes[1].p.done
	nodes[1].p.done <- nil
	_, err = hekeys.ThresholdDecrypt(ctx, dec, keys, sum)
	var ce *client.Error
	if err == nil || !errorsAs(err, &ce) || ce.Status != 503 || !strings.Contains(err.Error(), `"node-b"`) || !strings.Contains(err.Error(), `"node-c"`) {
		t.Fatalf("with one node left: %v", err)
	}
}

func errorsAs(err error, target **client.Error) bool {
	e, ok := err.(*client.Error)
	if ok {
		*target = e
	}
	return ok
}

// get reads a path of the node with its admin token.
func (n *node) get(t testing.TB, path string) []byte {
	t.Helper()
	tok, _ := os.ReadFile(filepath.Join(n.dir, "admin.token"))
	req, _ := http.NewRequest("GET", n.p.url()+path, nil)
	req.Header.Set("Authorization", "Bearer "+strings.TrimSpace(string(tok)))
	resp, err := n.client(t, "").HTTPClient().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 {
		t.Fatalf("%s GET %s: %d %s", n.name, path, resp.StatusCode, b)
	}
	return b
}

// auditRecords reads a node's whole audit log (up to its latest
// checkpoint).
func auditRecords(t *testing.T, c *client.Client) []*kms.AuditRecord {
	t.Helper()
	cp, err := c.AuditCheckpoint(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(string(cp), "\n")
	if len(lines) < 2 {
		t.Fatalf("checkpoint: %q", cp)
	}
	size, err := strconv.ParseUint(lines[1], 10, 64)
	if err != nil {
		t.Fatalf("checkpoint: %q", cp)
	}
	raw, err := c.AuditRecords(context.Background(), 0, size)
	if err != nil {
		t.Fatal(err)
	}
	var out []*kms.AuditRecord
	for _, b := range raw {
		r, err := kms.DecodeAuditRecord(b)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, r)
	}
	return out
}
