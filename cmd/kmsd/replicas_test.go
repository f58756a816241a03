package main

import (
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/kmsd-project/kmsd/api/client"
	"github.com/kmsd-project/kmsd/api/client/hekeys"
	"github.com/kmsd-project/kmsd/hsm/softhsm"
	"github.com/kmsd-project/kmsd/internal/testetcd"
	"github.com/kmsd-project/kmsd/internal/tests3"
	"github.com/kmsd-project/kmsd/kms"
	"github.com/kmsd-project/kmsd/store/etcd"
)

// startReplica runs kmsd on the etcd cluster. The first replica makes the
// embedded SoftHSM token under its data dir; the others use the same
// token through --pkcs11-module (the same KEK, as replicas on a real HSM
// share a partition).
func startReplica(t *testing.T, c *testetcd.Cluster, s3 *tests3.Server, dataDir, tokenOf string, extra ...string) *proc {
	t.Helper()
	args := []string{"--store", "etcd", "--etcd-endpoints", strings.Join(c.Endpoints(), ","), "--etcd-prefix", "/replicas/",
		"--audit-checkpoint-interval", "200ms", "--insecure-http"}
	args = append(args, extra...)
	env := []string{}
	if s3 != nil {
		args = append(args, "--s3-endpoint", s3.Endpoint, "--s3-bucket", s3.Bucket)
		env = append(env, "AWS_ACCESS_KEY_ID="+s3.AccessKey, "AWS_SECRET_ACCESS_KEY="+s3.SecretKey)
	}
	if tokenOf != "" {
		mod, err := softhsm.FindModule()
		if err != nil {
			t.Fatal(err)
		}
		hsmDir := filepath.Join(tokenOf, "softhsm")
		args = append(args, "--pkcs11-module", mod, "--pkcs11-pin-file", filepath.Join(hsmDir, "pin"))
		env = append(env, "SOFTHSM2_CONF="+filepath.Join(hsmDir, "softhsm2.conf"))
	}
	return startEnv(t, dataDir, env, args...)
}

// TestThreeReplicasOnEtcd: three kmsd replicas on a three-member etcd
// cluster, sharing the HSM token and an S3 bucket (a real versitygw). A
// key created on one is read on the others, an HE key's blobs made on one
// are fetched and verified through the others; rotations sent to all three at once all succeed with distinct
// versions; a token revoked on one is refused by the others within the
// watch's bound. Then, under a load of rotations, signs and reads, one
// replica and one etcd member are killed with SIGKILL: every acknowledged
// version and audit record is there afterwards, and the whole log
// verifies against a checkpoint, with no index missing or twice.
func TestThreeReplicasOnEtcd(t *testing.T) {
	c := testetcd.Start(t, 3)
	s3 := tests3.Start(t)
	dirs := []string{t.TempDir(), t.TempDir(), t.TempDir()}
	ps := []*proc{startReplica(t, c, s3, dirs[0], "")}
	ps[0].waitReady(t)
	// One at a time: SoftHSM's file store is not safe for two processes
	// opening the token at once (on a fresh Debian 12, under the whole
	// suite's load, one of two replicas started together found no token).
	// Replicas on a real HSM have no such limit.
	for _, d := range dirs[1:] {
		ps = append(ps, startReplica(t, c, s3, d, dirs[0]))
		ps[len(ps)-1].waitReady(t)
	}
	if _, err := os.Stat(filepath.Join(dirs[1], "admin.token")); err == nil {
		t.Fatal("a later replica made a second admin token")
	}
	admins := make([]*client.Client, 3)
	for i, p := range ps {
		admins[i] = adminClient(t, p, dirs[0])
	}

	// Create on one, read on the others.
	if _, err := admins[0].CreateKey(ctx, client.CreateKeyRequest{Name: "shared", Kind: "ml-dsa-65"}); err != nil {
		t.Fatal(err)
	}
	for i := 1; i < 3; i++ {
		if k, err := admins[i].GetKey(ctx, "shared"); err != nil || k.LatestVersion != 1 {
			t.Fatalf("replica %d: %+v %v", i, k, err)
		}
		if _, err := admins[i].Sign(ctx, "shared", []byte("m"), nil); err != nil {
			t.Fatalf("replica %d signs with a key another made: %v", i, err)
		}
	}

	// An HE key made on one replica: its blobs go to the shared bucket,
	// and the others serve them.
	small := client.Policy{Params: json.RawMessage(`"ckks-logn13"`), Rotations: []int{1}, Relinearization: true}
	if _, err := admins[1].CreateKey(ctx, client.CreateKeyRequest{Name: "he-shared", Kind: "ckks", Policy: &small}); err != nil {
		t.Fatal(err)
	}
	heBlobs := fetchHE(t, ps[0], dirs[0], "he-shared")
	fetchHE(t, ps[2], dirs[0], "he-shared")

	// Concurrent rotations across the replicas.
	var wg sync.WaitGroup
	got := make(chan uint64, 12)
	for i := range 12 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			v, err := admins[i%3].Rotate(ctx, "shared")
			if err != nil {
				t.Error(err)
				return
			}
			got <- v.Version
		}()
	}
	wg.Wait()
	close(got)
	seen := map[uint64]bool{}
	for n := range got {
		if seen[n] {
			t.Fatalf("version %d given twice", n)
		}
		seen[n] = true
	}
	if k, err := admins[2].GetKey(ctx, "shared"); err != nil || k.LatestVersion != 13 || len(seen) != 12 {
		t.Fatalf("after 12 rotations on three replicas: %+v %v, %d distinct", k, err, len(seen))
	}

	// A token revoked on one replica stops on the others.
	tok, err := admins[0].CreateToken(ctx, client.CreateTokenRequest{Role: "admin", Keys: []string{"shared"}})
	if err != nil {
		t.Fatal(err)
	}
	signers := make([]*client.Client, 3)
	for i, p := range ps {
		if signers[i], err = p.client(t, tok.Token); err != nil {
			t.Fatal(err)
		}
		if _, err := signers[i].Sign(ctx, "shared", []byte("m"), nil); err != nil {
			t.Fatalf("replica %d: %v", i, err)
		}
	}
	if _, err := admins[1].RevokeToken(ctx, tok.ID); err != nil {
		t.Fatal(err)
	}
	revoked := time.Now()
	for i := range 3 {
		for {
			_, err := signers[i].Sign(ctx, "shared", []byte("m"), nil)
			if err != nil && client.StatusOf(err) == 401 {
				break
			}
			if time.Since(revoked) > 3*time.Second {
				t.Fatalf("replica %d still accepts a token revoked %v ago: %v", i, time.Since(revoked), err)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	t.Logf("revocation effective on all replicas after %v", time.Since(revoked).Round(time.Millisecond))

	// Load, then kill -9 one replica and one etcd member.
	var mu sync.Mutex
	var acked []op
	versions := map[uint64]bool{}
	stop := make(chan struct{})
	var lw sync.WaitGroup
	for i := range 3 {
		for g := range 3 {
			lw.Add(1)
			go func() {
				defer lw.Done()
				for j := 0; ; j++ {
					select {
					case <-stop:
						return
					default:
					}
					var o op
					var err error
					switch g {
					case 0:
						var v *client.Version
						v, err = admins[i].Rotate(ctx, "shared")
						if err == nil {
							o = op{"POST /v1/keys/{name}/rotate", "shared", v.Version, 201}
							mu.Lock()
							versions[v.Version] = true
							mu.Unlock()
						}
					case 1:
						name := fmt.Sprintf("k-%d-%d", i, j)
						_, err = admins[i].CreateKey(ctx, client.CreateKeyRequest{Name: name, Kind: "ml-kem-768"})
						o = op{"POST /v1/keys", name, 1, 201}
					default:
						_, err = admins[i].GetKey(ctx, "shared")
						o = op{"GET /v1/keys/{name}", "shared", 0, 200}
					}
					if err == nil {
						mu.Lock()
						acked = append(acked, o)
						mu.Unlock()
					}
				}
			}()
		}
	}
	time.Sleep(time.Second)
	ps[2].cmd.Process.Kill()
	c.Kill(1)
	time.Sleep(2 * time.Second)
	close(stop)
	lw.Wait()
	c.Restart(1)
	c.WaitHealthy()
	ps[2] = startReplica(t, c, s3, dirs[2], dirs[0])
	ps[2].waitReady(t)

	// The restarted replica removed no blob of the HE key as an orphan
	// (orphans must be an hour old), and serves them.
	fetchHE(t, ps[2], dirs[0], "he-shared")
	if n := countObjects(t, s3); n != heBlobs {
		t.Fatalf("the bucket holds %d objects, want the HE key's %d blobs", n, heBlobs)
	}

	// A checkpoint past everything acknowledged (checkpoints every 200ms).
	admin := adminClient(t, ps[2], dirs[0])
	var res any
	deadline := time.Now().Add(10 * time.Second)
	var recs []*kms.AuditRecord
	for {
		r, rs := verifyLog(t, admin)
		res, recs = r, rs
		if countAcked(recs, acked) == len(acked) || time.Now().After(deadline) {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	for _, o := range acked {
		if !hasRecord(recs, o) {
			t.Fatalf("acknowledged %+v has no record in the verified log (%d records)", o, len(recs))
		}
	}
	for i, r := range recs {
		if r.Index != uint64(i) {
			t.Fatalf("record %d has index %d", i, r.Index)
		}
	}
	stored := map[uint64]bool{}
	for page := ""; ; {
		l, err := admin.ListVersions(ctx, "shared", 1000, page)
		if err != nil {
			t.Fatal(err)
		}
		for _, v := range l.Versions {
			stored[v.Version] = true
		}
		if page = l.NextPageToken; page == "" {
			break
		}
	}
	for n := range versions {
		if !stored[n] {
			t.Fatalf("acknowledged version %d is not stored", n)
		}
	}
	t.Logf("%d requests acknowledged under load (%d rotations); %d records verified: %v", len(acked), len(versions), len(recs), res)

	// kmsctl audit verify over the whole log.
	out, err := exec.Command(kmsctlBin, "--url", ps[0].url(), "--token-file", filepath.Join(dirs[0], "admin.token"), "audit", "verify",
		"--identity-key-file", filepath.Join(t.TempDir(), "identity.pub"), "--fetch-identity").CombinedOutput()
	if err != nil {
		t.Fatalf("kmsctl audit verify: %v\n%s", err, out)
	}
	t.Logf("kmsctl audit verify: %s", strings.TrimSpace(string(out)))
}

func countAcked(recs []*kms.AuditRecord, acked []op) int {
	n := 0
	for _, o := range acked {
		if hasRecord(recs, o) {
			n++
		}
	}
	return n
}

// TestEtcdDownFailsClosed: with its etcd cluster gone, kmsd answers a clear
// 503 (problem+json) to a state change and to a read whose audit record
// cannot be made durable, says it is not ready, and changes nothing; once
// etcd is back it serves again and every acknowledged request is in the
// verified log.
func TestEtcdDownFailsClosed(t *testing.T) {
	c := testetcd.Start(t, 1)
	dir := t.TempDir()
	p := startReplica(t, c, nil, dir, "")
	p.waitReady(t)
	admin := adminClient(t, p, dir)
	if _, err := admin.CreateKey(ctx, client.CreateKeyRequest{Name: "before", Kind: "ml-dsa-44"}); err != nil {
		t.Fatal(err)
	}
	c.Kill(0)
	if _, err := admin.CreateKey(ctx, client.CreateKeyRequest{Name: "during", Kind: "ml-dsa-44"}); client.StatusOf(err) != 503 {
		t.Fatalf("create with etcd down: %v, want 503", err)
	}
	if _, err := admin.GetKey(ctx, "before"); client.StatusOf(err) != 503 {
		t.Fatalf("audited read with etcd down: %v, want 503", err)
	}
	if err := admin.Ready(ctx); err == nil {
		t.Fatal("ready with etcd down")
	}
	c.Restart(0)
	c.WaitHealthy()
	back := time.Now()
	// etcd.ReconnectMax caps the client's reconnect backoff; with gRPC's
	// default (up to 2 minutes) kmsd stayed unready for 10 s and more.
	deadline := back.Add(10 * time.Second)
	for admin.Ready(ctx) != nil {
		if time.Now().After(deadline) {
			t.Fatal("not ready again 10 s after etcd came back")
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Logf("ready again %v after etcd came back", time.Since(back).Round(time.Millisecond))
	if _, err := admin.GetKey(ctx, "during"); client.StatusOf(err) != 404 {
		t.Fatalf("the create refused while etcd was down: %v, want 404", err)
	}
	if _, err := admin.CreateKey(ctx, client.CreateKeyRequest{Name: "after", Kind: "ml-dsa-44"}); err != nil {
		t.Fatal(err)
	}
	// The leader may have to be elected again (its session's lease
	// outlived by the outage) before it signs a checkpoint.
	deadline = time.Now().Add(20 * time.Second)
	for {
		if _, err := admin.AuditCheckpoint(ctx); client.StatusOf(err) == 404 && time.Now().Before(deadline) {
			time.Sleep(200 * time.Millisecond)
			continue
		}
		_, recs := verifyLog(t, admin)
		if hasRecord(recs, op{"POST /v1/keys", "before", 1, 201}) && hasRecord(recs, op{"POST /v1/keys", "after", 1, 201}) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("acknowledged creates have no record in the verified log")
		}
		time.Sleep(200 * time.Millisecond)
	}

	// SIGTERM with etcd gone ends kmsd (it hung in the election's
	// clean-up, waiting on etcd without a timeout).
	c.Kill(0)
	term := time.Now()
	p.cmd.Process.Signal(syscall.SIGTERM)
	p.wait(t, 60*time.Second)
	t.Logf("stopped %v after SIGTERM with etcd gone", time.Since(term).Round(time.Millisecond))
}

// fetchHE fetches and verifies an HE key's version 1 (public and
// evaluation keys, against the signed manifest) through p, and returns
// how many blobs it has.
func fetchHE(t *testing.T, p *proc, tokenDir, name string) int {
	t.Helper()
	tok, err := os.ReadFile(filepath.Join(tokenDir, "admin.token"))
	if err != nil {
		t.Fatal(err)
	}
	c := adminClient(t, p, tokenDir)
	id, err := c.Identity(ctx)
	if err != nil {
		t.Fatal(err)
	}
	f := &hekeys.Fetcher{BaseURL: p.url(), Token: strings.TrimSpace(string(tok)), IdentityKey: id.PublicKey, CacheDir: t.TempDir(), HTTP: http.DefaultClient}
	k, err := f.Fetch(ctx, name, 1)
	if err != nil {
		t.Fatalf("%s through %s: %v", name, p.url(), err)
	}
	if k.PublicKey == nil || k.EvaluationKeys == nil || len(k.Manifest.Blobs()) < 3 {
		t.Fatalf("%s through %s: incomplete keys", name, p.url())
	}
	return len(k.Manifest.Blobs())
}

func countObjects(t *testing.T, s *tests3.Server) int {
	t.Helper()
	n := 0
	for o := range s.Client(t).ListObjects(ctx, s.Bucket, minio.ListObjectsOptions{Recursive: true}) {
		if o.Err != nil {
			t.Fatal(o.Err)
		}
		n++
	}
	return n
}

// TestEtcdFullFailsClosed: etcd's full disk is its space quota (here a
// small --quota-backend-bytes; on a real cluster, a full volume raises the
// same NOSPACE alarm). Once etcd refuses writes, kmsd answers a state
// change and an audited read with a 503 problem and changes nothing; once
// the operator makes room (a larger quota, the alarm disarmed), kmsd
// serves again, and every acknowledged request is in the verified log.
func TestEtcdFullFailsClosed(t *testing.T) {
	c := testetcd.StartWith(t, 1, "--quota-backend-bytes", strconv.Itoa(2<<20))
	dir := t.TempDir()
	p := startReplica(t, c, nil, dir, "")
	p.waitReady(t)
	admin := adminClient(t, p, dir)
	var acked []string
	var refused error
	for i := 0; i < 5000 && refused == nil; i++ {
		name := fmt.Sprintf("k%d", i)
		if _, err := admin.CreateKey(ctx, client.CreateKeyRequest{Name: name, Kind: "ml-dsa-44"}); err != nil {
			refused = err
			break
		}
		acked = append(acked, name)
	}
	if refused == nil {
		t.Fatal("etcd never filled up")
	}
	if client.StatusOf(refused) != 503 || !client.IsProblem(refused, "unavailable") {
		t.Fatalf("create with etcd full: %v, want a 503 unavailable problem", refused)
	}
	t.Logf("etcd full after %d creates: %v", len(acked), refused)
	if _, err := admin.Rotate(ctx, acked[0]); client.StatusOf(err) != 503 {
		t.Fatalf("rotate with etcd full: %v, want 503", err)
	}
	if _, err := admin.GetKey(ctx, acked[0]); client.StatusOf(err) != 503 {
		t.Fatalf("audited read with etcd full: %v, want 503", err)
	}

	// The operator makes room: a larger quota (etcd restarted with it),
	// then the alarm disarmed.
	c.Kill(0)
	c.SetFlag("--quota-backend-bytes", strconv.Itoa(64<<20))
	c.Restart(0)
	c.WaitHealthy()
	cli, err := clientv3.New(etcd.ClientConfig(c.Endpoints(), nil))
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	if _, err := cli.AlarmDisarm(ctx, &clientv3.AlarmMember{}); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(15 * time.Second)
	for admin.Ready(ctx) != nil {
		if time.Now().After(deadline) {
			t.Fatalf("not ready again after the alarm was disarmed: %v", admin.Ready(ctx))
		}
		time.Sleep(100 * time.Millisecond)
	}
	k, err := admin.GetKey(ctx, acked[0])
	if err != nil || k.LatestVersion != 1 {
		t.Fatalf("the rotation refused while etcd was full: %+v %v, want version 1 only", k, err)
	}
	if _, err := admin.GetKey(ctx, fmt.Sprintf("k%d", len(acked))); client.StatusOf(err) != 404 {
		t.Fatalf("the create refused while etcd was full: %v, want 404", err)
	}
	if _, err := admin.CreateKey(ctx, client.CreateKeyRequest{Name: "after", Kind: "ml-dsa-44"}); err != nil {
		t.Fatal(err)
	}
	deadline = time.Now().Add(20 * time.Second)
	for {
		if _, err := admin.AuditCheckpoint(ctx); err == nil {
			_, recs := verifyLog(t, admin)
			missing := 0
			for _, name := range append(acked, "after") {
				if !hasRecord(recs, op{"POST /v1/keys", name, 1, 201}) {
					missing++
				}
			}
			if missing == 0 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%d acknowledged creates have no record in the verified log", missing)
			}
		} else if time.Now().After(deadline) {
			t.Fatal(err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// TestConcurrentFirstStart: two replicas started at the same moment on an
// empty prefix, each with an embedded SoftHSM token of its own (so each
// would make a KEK): exactly one serves; the other stops with an error
// that says what to do, and leaves no admin token behind. The store ends
// with one KEK record and one admin token, whichever way the race goes
// (three rounds).
func TestConcurrentFirstStart(t *testing.T) {
	c := testetcd.Start(t, 1)
	for round := range 3 {
		prefix := fmt.Sprintf("/first-%d/", round)
		dirs := []string{t.TempDir(), t.TempDir()}
		ps := make([]*proc, 2)
		for i := range ps {
			ps[i] = startEnv(t, dirs[i], nil, "--store", "etcd", "--etcd-endpoints", strings.Join(c.Endpoints(), ","),
				"--etcd-prefix", prefix, "--insecure-http")
		}
		serving, stopped := -1, -1
		deadline := time.Now().Add(30 * time.Second)
		for serving < 0 || stopped < 0 {
			for i, p := range ps {
				select {
				case err := <-p.done:
					p.done <- err
					if stopped >= 0 && stopped != i {
						t.Fatalf("round %d: neither replica serves:\n%s\n%s", round, ps[0].stderr.String(), ps[1].stderr.String())
					}
					stopped = i
				default:
					if cl, err := p.client(t, ""); err == nil && cl.Ready(ctx) == nil && i != stopped {
						serving = i
					}
				}
			}
			if time.Now().After(deadline) {
				t.Fatalf("round %d: after 30 s, serving %d, stopped %d (both must not serve)", round, serving, stopped)
			}
			time.Sleep(50 * time.Millisecond)
		}
		if code := ps[stopped].wait(t, time.Second); code == 0 {
			t.Fatalf("round %d: replica %d exited 0", round, stopped)
		}
		if _, err := os.Stat(filepath.Join(dirs[stopped], "admin.token")); err == nil {
			t.Fatalf("round %d: the replica that stopped left an admin token", round)
		}
		t.Logf("round %d: replica %d stopped: %s", round, stopped, lastLine(ps[stopped].stderr.String()))
		ps[serving].waitReady(t)
		admin := adminClient(t, ps[serving], dirs[serving])
		toks, err := admin.ListTokens(ctx, 100, "")
		if err != nil || len(toks.Tokens) != 1 {
			t.Fatalf("round %d: tokens %+v %v, want the one admin token", round, toks, err)
		}
		ps[serving].cmd.Process.Kill()
		ps[serving].wait(t, 10*time.Second)
	}
}

func lastLine(s string) string {
	s = strings.TrimSpace(s)
	return s[strings.LastIndexByte(s, '\n')+1:]
}

// TestEtcdMutualTLS: kmsd reaches an etcd that requires client
// certificates with --etcd-ca, --etcd-cert and --etcd-key; without a
// certificate, or with one from another CA, it does not start (and says
// what to check), having written nothing.
func TestEtcdMutualTLS(t *testing.T) {
	certs := t.TempDir()
	ca, caKey := certPair(t, certs, "etcdca", nil, nil, caTmpl("etcd CA"))
	certPair(t, certs, "server", ca, caKey, &x509.Certificate{Subject: pkix.Name{CommonName: "etcd"}, IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}})
	certPair(t, certs, "kmsd", ca, caKey, &x509.Certificate{Subject: pkix.Name{CommonName: "kmsd"}, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}})
	other, otherKey := certPair(t, certs, "otherca", nil, nil, caTmpl("other CA"))
	certPair(t, certs, "stranger", other, otherKey, &x509.Certificate{Subject: pkix.Name{CommonName: "stranger"}, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}})
	pem := func(name string) string { return filepath.Join(certs, name+".pem") }
	key := func(name string) string { return filepath.Join(certs, name+"-key.pem") }
	clientCert, err := tls.LoadX509KeyPair(pem("kmsd"), key("kmsd"))
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(ca)
	c := testetcd.StartTLS(t, 1, testetcd.TLS{Cert: pem("server"), Key: key("server"), CA: pem("etcdca"),
		Client: &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{clientCert}}})
	base := []string{"--store", "etcd", "--etcd-endpoints", c.Endpoints()[0], "--etcd-ca", pem("etcdca"), "--insecure-http"}

	// Refused first, so that the store is still empty for the good one.
	var wg sync.WaitGroup
	for _, name := range []string{"", "stranger"} {
		wg.Go(func() {
			args := slices.Clone(base)
			if name != "" {
				args = append(args, "--etcd-cert", pem(name), "--etcd-key", key(name))
			}
			p := startEnv(t, t.TempDir(), nil, args...)
			if code := p.wait(t, 60*time.Second); code == 0 {
				t.Errorf("client certificate %q: kmsd exited 0", name)
			}
			t.Logf("client certificate %q: %s", name, lastLine(p.stderr.String()))
			if out := p.stderr.String(); !strings.Contains(out, "etcd did not answer") || !strings.Contains(out, "--etcd-cert") {
				t.Errorf("client certificate %q: the error does not say what to check:\n%s", name, out)
			}
		})
	}
	wg.Wait()
	dir := t.TempDir()
	p := startEnv(t, dir, nil, append(base, "--etcd-cert", pem("kmsd"), "--etcd-key", key("kmsd"))...)
	p.waitReady(t)
	admin := adminClient(t, p, dir)
	if _, err := admin.CreateKey(ctx, client.CreateKeyRequest{Name: "over-tls", Kind: "ml-dsa-44"}); err != nil {
		t.Fatal(err)
	}
	cli, err := clientv3.New(etcd.ClientConfig(c.Endpoints(), &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{clientCert}}))
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	if resp, err := cli.Get(ctx, "/kmsd/k/over-tls", clientv3.WithCountOnly()); err != nil || resp.Count != 1 {
		t.Fatalf("the key in etcd: %v %v", resp, err)
	}
	if resp, err := cli.Get(ctx, "/kmsd/t/", clientv3.WithPrefix(), clientv3.WithCountOnly()); err != nil || resp.Count != 1 {
		t.Fatalf("tokens in etcd: %v %v, want the one admin token (the refused starts wrote none)", resp, err)
	}
}
