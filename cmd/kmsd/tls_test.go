package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kmsd-project/kmsd/api/client"
	"github.com/kmsd-project/kmsd/internal/buildinfo"
	"github.com/kmsd-project/kmsd/internal/testutil"
	"github.com/kmsd-project/kmsd/internal/tlsutil"
)

// dialTLS connects to p with only the given key exchange groups and
// versions, trusting the CA kmsd made.
func dialTLS(t *testing.T, p *proc, cfg *tls.Config) (tls.ConnectionState, error) {
	t.Helper()
	pool, err := tlsutil.LoadPool(filepath.Join(p.dataDir, "tls", "ca.pem"))
	if err != nil {
		t.Fatal(err)
	}
	cfg.RootCAs = pool
	cfg.ServerName = "127.0.0.1"
	c, err := tls.Dial("tcp", p.addr, cfg)
	if err != nil {
		return tls.ConnectionState{}, err
	}
	defer c.Close()
	return c.ConnectionState(), nil
}

// TestTLSPostQuantumByDefault: the embedded default serves HTTPS under a
// local CA made at first start; a client that offers only X25519MLKEM768
// negotiates it, one that offers only X25519 falls back to it, and TLS 1.2
// or a group kmsd does not offer is refused.
func TestTLSPostQuantumByDefault(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "data")
	p := start(t, dir)
	p.waitReady(t)
	st, err := dialTLS(t, p, &tls.Config{CurvePreferences: []tls.CurveID{tls.X25519MLKEM768}})
	if err != nil {
		t.Fatalf("X25519MLKEM768-only client: %v", err)
	}
	if st.CurveID != tls.X25519MLKEM768 || st.Version != tls.VersionTLS13 {
		t.Fatalf("negotiated %v, version %x", st.CurveID, st.Version)
	}
	if st, err := dialTLS(t, p, &tls.Config{CurvePreferences: []tls.CurveID{tls.X25519}}); err != nil || st.CurveID != tls.X25519 {
		t.Fatalf("X25519-only client: %v %v", st.CurveID, err)
	}
	if st, err := dialTLS(t, p, &tls.Config{}); err != nil || st.CurveID != tls.X25519MLKEM768 {
		t.Fatalf("a default Go client: %v %v", st.CurveID, err)
	}
	if _, err := dialTLS(t, p, &tls.Config{MaxVersion: tls.VersionTLS12}); err == nil {
		t.Fatal("a TLS 1.2 client was served")
	}
	if _, err := dialTLS(t, p, &tls.Config{CurvePreferences: []tls.CurveID{tls.CurveP256}}); err == nil {
		t.Fatal("a P-256-only client was served")
	}
	// Plain HTTP on the TLS port gets nothing useful.
	if resp, err := http.Get("http://" + p.addr + "/healthz"); err == nil {
		resp.Body.Close()
		if resp.StatusCode == 200 {
			t.Fatal("plain HTTP answered 200 on the TLS port")
		}
	}
	for _, f := range []string{"ca-key.pem", "server-key.pem"} {
		fi, err := os.Stat(filepath.Join(dir, "tls", f))
		if err != nil || fi.Mode().Perm() != 0o600 {
			t.Fatalf("%s: %v %v", f, fi.Mode(), err)
		}
	}
	c := adminClient(t, p, dir)
	if _, err := c.ListKeys(ctx, 0, ""); err != nil {
		t.Fatalf("an admin over HTTPS: %v", err)
	}
	// A restart keeps the CA: clients pinned to it still connect.
	ca1, _ := os.ReadFile(filepath.Join(dir, "tls", "ca.pem"))
	p.cmd.Process.Signal(syscall.SIGTERM)
	p.wait(t, 20*time.Second)
	p = start(t, dir)
	p.waitReady(t)
	if ca2, _ := os.ReadFile(filepath.Join(dir, "tls", "ca.pem")); string(ca1) != string(ca2) {
		t.Fatal("the local CA changed across a restart")
	}
}

// TestInsecureHTTPOnlyOnLoopback: plain HTTP is served only when asked for
// and only on loopback; every flag is checked before the data dir is made.
func TestInsecureHTTPOnlyOnLoopback(t *testing.T) {
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"--insecure-http", "--addr", "0.0.0.0:8420"}, "only on a loopback"},
		{[]string{"--insecure-http", "--addr", "192.0.2.1:8420"}, "only on a loopback"},
		{[]string{"--insecure-http", "--addr", ":8420"}, "only on a loopback"},
		{[]string{"--insecure-http", "--tls-client-ca", "x.pem"}, "cannot be combined"},
		{[]string{"--tls-cert", "x.pem"}, "go together"},
		{[]string{"--addr", "nonsense"}, "host:port"},
	} {
		dir := filepath.Join(t.TempDir(), "data")
		var stderr testutil.Buffer
		err := run(ctx, append([]string{"--data-dir", dir}, c.args...), func(string) string { return "" }, &stderr, nil)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%v: %v, want %q", c.args, err, c.want)
		}
		if _, err := os.Stat(dir); err == nil {
			t.Errorf("%v: the data dir was made before the flags were checked", c.args)
		}
	}
	dir := filepath.Join(t.TempDir(), "data")
	p := start(t, dir, "--insecure-http")
	p.waitReady(t)
	if _, err := adminClient(t, p, dir).ListKeys(ctx, 0, ""); err != nil {
		t.Fatalf("plain HTTP on loopback: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "tls")); err == nil {
		t.Fatal("--insecure-http made a TLS directory")
	}
}

// certPair writes a key and a certificate signed by parent (self-signed
// when parent is nil) and returns the certificate and key.
func certPair(t *testing.T, dir, name string, parent *x509.Certificate, parentKey *ecdsa.PrivateKey, tmpl *x509.Certificate) (*x509.Certificate, *ecdsa.PrivateKey) {
	t.Helper()
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	sn, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	tmpl.SerialNumber = sn
	tmpl.NotBefore, tmpl.NotAfter = time.Now().Add(-time.Hour), time.Now().Add(time.Hour)
	if parent == nil {
		parent, parentKey = tmpl, k
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, &k.PublicKey, parentKey)
	if err != nil {
		t.Fatal(err)
	}
	kd, _ := x509.MarshalPKCS8PrivateKey(k)
	os.WriteFile(filepath.Join(dir, name+".pem"), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600)
	os.WriteFile(filepath.Join(dir, name+"-key.pem"), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kd}), 0o600)
	c, _ := x509.ParseCertificate(der)
	return c, k
}

func caTmpl(cn string) *x509.Certificate {
	return &x509.Certificate{Subject: pkix.Name{CommonName: cn}, IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
}

// TestTLSCertificateReloadOnSIGHUP: --tls-cert/--tls-key are read again on
// SIGHUP; new connections get the new certificate, a bad file keeps the
// old one in use, and kmsd keeps running.
func TestTLSCertificateReloadOnSIGHUP(t *testing.T) {
	certs := t.TempDir()
	ca, caKey := certPair(t, certs, "ca", nil, nil, caTmpl("test CA"))
	server := &x509.Certificate{Subject: pkix.Name{CommonName: "one"}, DNSNames: []string{"localhost"}, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	certPair(t, certs, "server", ca, caKey, server)
	dir := filepath.Join(t.TempDir(), "data")
	p := start(t, dir, "--tls-cert", filepath.Join(certs, "server.pem"), "--tls-key", filepath.Join(certs, "server-key.pem"))
	pool := x509.NewCertPool()
	pool.AddCert(ca)
	leafCN := func() string {
		c, err := tls.Dial("tcp", p.addr, &tls.Config{RootCAs: pool, ServerName: "localhost"})
		if err != nil {
			return "error: " + err.Error()
		}
		defer c.Close()
		return c.ConnectionState().PeerCertificates[0].Subject.CommonName
	}
	deadline := time.Now().Add(20 * time.Second)
	for leafCN() != "one" {
		if time.Now().After(deadline) {
			t.Fatalf("kmsd did not serve its certificate: %s\n%s", leafCN(), p.stderr.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
	if _, err := os.Stat(filepath.Join(dir, "tls")); err == nil {
		t.Fatal("a local CA was made though --tls-cert was given")
	}
	certPair(t, certs, "server", ca, caKey, &x509.Certificate{Subject: pkix.Name{CommonName: "two"}, DNSNames: []string{"localhost"}, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}})
	p.cmd.Process.Signal(syscall.SIGHUP)
	for leafCN() != "two" {
		if time.Now().After(deadline) {
			t.Fatalf("the renewed certificate is not served: %s\n%s", leafCN(), p.stderr.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
	os.WriteFile(filepath.Join(certs, "server.pem"), []byte("garbage"), 0o600)
	p.cmd.Process.Signal(syscall.SIGHUP)
	for !strings.Contains(p.stderr.String(), "TLS certificate not reloaded") {
		if time.Now().After(deadline) {
			t.Fatalf("a bad reload was not reported\n%s", p.stderr.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
	if cn := leafCN(); cn != "two" {
		t.Fatalf("after a bad reload: %s", cn)
	}
}

// TestMutualTLS: with --tls-client-ca, a client without a certificate, or
// with one from another CA, is refused in the handshake, before any
// handler, and the refusal is in the audit log with its source; a client
// with a certificate from the CA is served.
func TestMutualTLS(t *testing.T) {
	certs := t.TempDir()
	ca, caKey := certPair(t, certs, "clientca", nil, nil, caTmpl("client CA"))
	certPair(t, certs, "client", ca, caKey, &x509.Certificate{Subject: pkix.Name{CommonName: "mcp-1"}, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}})
	other, otherKey := certPair(t, certs, "otherca", nil, nil, caTmpl("other CA"))
	certPair(t, certs, "stranger", other, otherKey, &x509.Certificate{Subject: pkix.Name{CommonName: "stranger"}, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}})
	dir := filepath.Join(t.TempDir(), "data")
	p := start(t, dir, "--tls-client-ca", filepath.Join(certs, "clientca.pem"), "--audit-checkpoint-interval", "100ms")
	caFile := filepath.Join(dir, "tls", "ca.pem")
	tok := func() string {
		b, _ := os.ReadFile(filepath.Join(dir, "admin.token"))
		return strings.TrimSpace(string(b))
	}
	withCert := func(name string) (*client.Client, error) {
		cert, key := "", ""
		if name != "" {
			cert, key = filepath.Join(certs, name+".pem"), filepath.Join(certs, name+"-key.pem")
		}
		cfg, err := client.TLSConfig(caFile, cert, key)
		if err != nil {
			return nil, err
		}
		return client.New(p.url(), tok(), client.WithTLS(cfg))
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		if c, err := withCert("client"); err == nil && c.Ready(ctx) == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("kmsd not ready\n%s", p.stderr.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
	for _, name := range []string{"", "stranger"} {
		c, err := withCert(name)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c.ListKeys(ctx, 0, ""); err == nil || client.StatusOf(err) != 0 {
			t.Fatalf("client certificate %q: %v, want a refused handshake", name, err)
		}
	}
	good, _ := withCert("client")
	if _, err := good.ListKeys(ctx, 0, ""); err != nil {
		t.Fatalf("with a client certificate: %v", err)
	}
	// Both refusals are recorded, with the client's address.
	var reasons []string
	for time.Now().Before(deadline) {
		reasons = reasons[:0]
		_, recs := verifyLog(t, good) // the log verifies against a signed checkpoint
		for _, r := range recs {
			if strings.HasPrefix(r.Operation, "TLS handshake refused") && strings.HasPrefix(r.Source, "127.0.0.1:") && r.Status == 401 {
				reasons = append(reasons, r.Operation)
			}
		}
		if len(reasons) >= 2 {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if len(reasons) < 2 || !strings.Contains(strings.Join(reasons, "|"), "no client certificate") || !strings.Contains(strings.Join(reasons, "|"), "does not chain") {
		t.Fatalf("refusals recorded: %q", reasons)
	}
}

// TestDebugAddrOnlyOnLoopback: the profiling endpoints are off by default,
// refused on a non-loopback address, and serve pprof on loopback.
func TestDebugAddrOnlyOnLoopback(t *testing.T) {
	exitsWith(t, t.TempDir(), "--debug-addr is refused", "--debug-addr", "0.0.0.0:0")
	dir := filepath.Join(t.TempDir(), "data")
	dbg := freeAddr(t)
	p := start(t, dir, "--debug-addr", dbg)
	p.waitReady(t)
	resp, err := http.Get("http://" + dbg + "/debug/pprof/goroutine?debug=1")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || !strings.Contains(string(body), "goroutine profile") {
		t.Fatalf("debug endpoint: %d %.200s", resp.StatusCode, body)
	}
	// The API port does not serve them.
	c := adminClient(t, p, dir)
	if _, err := c.GetKey(ctx, "debug"); !client.IsProblem(err, "not-found") {
		t.Fatalf("%v", err)
	}
}

// TestBadSettingsStopBeforeDisk: a wrong setting, from a flag or from the
// environment, stops kmsd with a message naming it and nothing on disk: a
// client URL in KMS_ADDR, an environment value that does not parse (never a
// silent default), files that cannot be read, an address in use.
func TestBadSettingsStopBeforeDisk(t *testing.T) {
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	s3Env := map[string]string{"AWS_ACCESS_KEY_ID": "AKIAEXAMPLE", "AWS_SECRET_ACCESS_KEY": "s3cret-pw"}
	for _, c := range []struct {
		env  map[string]string
		args []string
		want string
	}{
		{map[string]string{"KMS_ADDR": "https://127.0.0.1:8420"}, nil, "listen address and must be host:port"},
		{nil, []string{"--addr", "127.0.0.1:http"}, "port \"http\" is not a number"},
		{nil, []string{"--addr", "127.0.0.1:70000"}, "not a number from 0 to 65535"},
		{nil, []string{"--addr", "exa mple:8420"}, "not an IP address or a DNS name"},
		{map[string]string{"KMS_AUDIT_WAL_MIB": "16MiB"}, nil, `KMS_AUDIT_WAL_MIB="16MiB"`},
		{map[string]string{"KMS_KEY_CACHE_TTL": "5 minutes"}, nil, `KMS_KEY_CACHE_TTL="5 minutes"`},
		{map[string]string{"KMS_UNAUTH_RATE_LIMIT": "lots"}, nil, "KMS_UNAUTH_RATE_LIMIT"},
		{map[string]string{"KMS_INSECURE_HTTP": "true"}, nil, "must be 1 or 0"},
		{nil, []string{"--addr", busy.Addr().String()}, "address already in use"},
		{nil, []string{"--tls-cert", "/nonexistent/cert.pem", "--tls-key", "/nonexistent/key.pem"}, "--tls-cert"},
		{nil, []string{"--tls-client-ca", "/nonexistent/ca.pem"}, "--tls-client-ca"},
		{nil, []string{"--pkcs11-module", "/nonexistent/libhsm.so", "--pkcs11-pin-file", "/nonexistent/pin"}, "--pkcs11-module"},
		{nil, []string{"--pkcs11-module", "/nonexistent/libhsm.so"}, "no PIN"},
		{nil, []string{"--audit-stream", "/nonexistent/dir/audit.jsonl"}, "--audit-stream"},
		{map[string]string{"KMS_STORE": "mysql"}, nil, `--store "mysql": want bolt`},
		{nil, []string{"--store", "etcd"}, "needs --etcd-endpoints"},
		{nil, []string{"--etcd-endpoints", "http://127.0.0.1:2379"}, "is for --store etcd"},
		{nil, []string{"--store", "etcd", "--etcd-endpoints", "http://10.0.0.1:2379"}, "plain HTTP to a host that is not loopback"},
		{nil, []string{"--store", "etcd", "--etcd-endpoints", "127.0.0.1:2379"}, "is not an http:// or https:// URL"},
		{nil, []string{"--store", "etcd", "--etcd-endpoints", "https://kmsd:s3cret-pw@10.0.0.1:2379"}, "endpoint 1 carries credentials"},
		{nil, []string{"--store", "etcd", "--etcd-endpoints", "https://10.0.0.1:2379", "--etcd-cert", "/nonexistent/c.pem"}, "go together"},
		{nil, []string{"--store", "etcd", "--etcd-endpoints", "https://10.0.0.1:2379", "--etcd-ca", "/nonexistent/ca.pem"}, "--etcd-ca"},
		{nil, []string{"--store", "etcd", "--etcd-endpoints", "https://10.0.0.1:2379", "--etcd-prefix", "kmsd"}, "must start with /"},
		{nil, []string{"--s3-bucket", "kmsd-blobs"}, "go with --s3-endpoint"},
		{s3Env, []string{"--s3-endpoint", "http://10.0.0.1:7070", "--s3-bucket", "kmsd-blobs"}, "loopback address only"},
		{s3Env, []string{"--s3-endpoint", "https://AKIA:s3cret-pw@s3.example.com", "--s3-bucket", "kmsd-blobs"}, "credentials in the URL are refused"},
		{s3Env, []string{"--s3-endpoint", "https://s3.example.com/bucket", "--s3-bucket", "kmsd-blobs"}, "no path"},
		{s3Env, []string{"--s3-endpoint", "https://s3.example.com"}, "needs --s3-bucket"},
		{s3Env, []string{"--s3-endpoint", "https://s3.example.com", "--s3-bucket", "kmsd-blobs", "--s3-prefix", "../x/"}, "--s3-prefix"},
		{s3Env, []string{"--s3-endpoint", "https://s3.example.com", "--s3-bucket", "kmsd-blobs", "--s3-prefix", "kmsd"}, "--s3-prefix"},
		{nil, []string{"--s3-endpoint", "https://s3.example.com", "--s3-bucket", "kmsd-blobs"}, "needs credentials in AWS_ACCESS_KEY_ID"},
		{s3Env, []string{"--s3-endpoint", "https://s3.example.com", "--s3-bucket", "Kmsd_Blobs"}, "not a bucket name"},
		{s3Env, []string{"--s3-endpoint", "https://s3.example.com", "--s3-bucket", "kmsd-blobs", "--s3-ca", "/nonexistent/ca.pem"}, "--s3-ca"},
	} {
		dir := filepath.Join(t.TempDir(), "data")
		var stderr testutil.Buffer
		args := append([]string{"--data-dir", dir}, c.args...)
		if c.env["KMS_ADDR"] == "" && !slices.Contains(c.args, "--addr") {
			args = append(args, "--addr", "127.0.0.1:0")
		}
		err := run(ctx, args, func(k string) string { return c.env[k] }, &stderr, nil)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%v %v: %v, want %q", c.env, c.args, err, c.want)
		}
		if err != nil && strings.Contains(err.Error()+stderr.String(), "s3cret-pw") {
			t.Errorf("%v: a password in a setting reached the error or the log: %v", c.args, err)
		}
		if _, err := os.Stat(dir); err == nil {
			t.Errorf("%v %v: the data dir was made before the setting was checked", c.env, c.args)
		}
	}
	// A flag given on the command line wins over a bad environment value.
	if _, err := parseFlags([]string{"--audit-wal-mib", "8"}, func(k string) string {
		return map[string]string{"KMS_AUDIT_WAL_MIB": "lots"}[k]
	}); err != nil {
		t.Errorf("a flag did not override a bad environment value: %v", err)
	}
}

// TestVersion: kmsd --version answers before any setting is checked, and
// the build line names the program, a version, a commit and the Go that
// built it.
func TestVersion(t *testing.T) {
	for _, arg := range []string{"--version", "-version", "version"} {
		if err := run(context.Background(), []string{arg}, func(string) string { return "" }, io.Discard, nil); !errors.Is(err, errVersion) {
			t.Errorf("%s: %v", arg, err)
		}
	}
	if s := buildinfo.String("kmsd"); !regexp.MustCompile(`^kmsd \S+ \(commit \S+.*, go1\.\d+`).MatchString(s) {
		t.Errorf("build line %q", s)
	}
}
