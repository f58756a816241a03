// Command kmsd is the key management server: it wires the HSM sealer, the
// bbolt store, the key kinds and the REST API, and starts and stops them.
package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"net/http"
	"net/http/pprof"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/kmsd-project/kmsd/api"
	"github.com/kmsd-project/kmsd/audit"
	"github.com/kmsd-project/kmsd/hsm"
	"github.com/kmsd-project/kmsd/hsm/softhsm"
	"github.com/kmsd-project/kmsd/internal/app"
	"github.com/kmsd-project/kmsd/internal/buildinfo"
	"github.com/kmsd-project/kmsd/internal/fileutil"
	"github.com/kmsd-project/kmsd/internal/metrics"
	"github.com/kmsd-project/kmsd/internal/tlsutil"
	"github.com/kmsd-project/kmsd/kms"
	"github.com/kmsd-project/kmsd/kms/pqc"
	"github.com/kmsd-project/kmsd/store"
	"github.com/kmsd-project/kmsd/store/archive"
)

// errVersion is run's answer to --version: main prints the build.
var errVersion = errors.New("version asked")

func main() {
	noCoreDumps()
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if len(os.Args) > 1 && os.Args[1] == "restore" {
		err := runRestore(ctx, os.Args[2:], os.Getenv, os.Stdout, os.Stderr)
		if errors.Is(err, errRestoreHelp) {
			fmt.Print(restoreUsageHead)
			printUsage(os.Stdout, os.Getenv)
			os.Exit(0)
		}
		if err != nil {
			fmt.Fprintf(os.Stderr, "kmsd restore: %v\n", err)
			os.Exit(1)
		}
		return
	}
	err := run(ctx, os.Args[1:], os.Getenv, os.Stderr, nil)
	if errors.Is(err, flag.ErrHelp) {
		printUsage(os.Stdout, os.Getenv)
		os.Exit(0)
	}
	if errors.Is(err, errVersion) {
		fmt.Println(buildinfo.String("kmsd"))
		os.Exit(0)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "kmsd: %v\n", err)
		os.Exit(1)
	}
}

// noCoreDumps keeps unsealed key material out of core files and away from
// same-user ptrace: RLIMIT_CORE 0 and PR_SET_DUMPABLE 0.
func noCoreDumps() {
	_ = syscall.Setrlimit(syscall.RLIMIT_CORE, &syscall.Rlimit{})
	const prSetDumpable = 4
	_, _, _ = syscall.RawSyscall(syscall.SYS_PRCTL, prSetDumpable, 0, 0)
}

type config struct {
	store           string
	etcdEndpoints   string
	etcdPrefix      string
	etcdCA          string
	etcdCert        string
	etcdKey         string
	s3Endpoint      string
	s3Bucket        string
	s3Prefix        string
	s3Region        string
	s3CA            string
	dataDir         string
	addr            string
	module          string
	token           string
	pinFile         string
	kekLabel        string
	wrapProfile     string
	cacheTTL        time.Duration
	destroyInterval time.Duration
	minRotation     time.Duration
	rotationCheck   time.Duration
	scrubInterval   time.Duration
	upgradeStore    bool
	shutdownTimeout time.Duration
	logLevel        string
	auditEvery      uint64
	auditInterval   time.Duration
	auditStream     string
	auditArchive    string
	auditRetain     time.Duration
	auditStreamWait time.Duration
	maxKeysetMiB    int64
	auditWALMiB     int64
	asyncKeysetMiB  int64
	heGenerations   int
	heWorkers       int
	heKeyForm       string
	peersFile       string
	maxTokenTTL     time.Duration
	issuer          string
	oauthTTL        time.Duration
	unauthRate      float64
	unauthBurst     int
	tokenRate       float64
	tlsCert         string
	tlsKey          string
	tlsClientCA     string
	insecureHTTP    bool
	debugAddr       string
	metricsAddr     string
	metricsToken    string
}

// parseFlags reads flags, with KMS_* environment variables as defaults.
func parseFlags(args []string, getenv func(string) string) (config, error) {
	var c config
	fs, envErrs := newFlagSetErrs(&c, getenv)
	fs.SetOutput(io.Discard) // errors are returned; main prints --help
	fs.Usage = func() {}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return c, err
		}
		return c, fmt.Errorf("%v (kmsd --help lists the flags)", err)
	}
	// An environment variable counts only where its flag was not given.
	given := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { given[f.Name] = true })
	for _, e := range *envErrs {
		if !given[envFlag(e.name)] {
			return c, e.err
		}
	}
	if fs.NArg() > 0 {
		return c, fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	if c.destroyInterval <= 0 || c.scrubInterval <= 0 || c.shutdownTimeout <= 0 || c.cacheTTL < 0 || c.auditInterval <= 0 || c.auditStreamWait <= 0 || c.maxTokenTTL < 0 || c.minRotation <= 0 || c.rotationCheck <= 0 {
		return c, errors.New("durations must be positive (key-cache-ttl and max-token-ttl may be 0)")
	}
	if c.oauthTTL < time.Minute || c.oauthTTL > 24*time.Hour || (c.maxTokenTTL > 0 && c.oauthTTL > c.maxTokenTTL) {
		return c, fmt.Errorf("--oauth-token-ttl %s must be from 1m to 24h, and at most --max-token-ttl", c.oauthTTL)
	}
	if c.issuer != "" {
		if err := checkIssuer(c.issuer, c.insecureHTTP); err != nil {
			return c, err
		}
	}
	if c.rotationCheck < time.Second {
		return c, fmt.Errorf("--rotation-check-interval %s is below the minimum of 1s (each check reads every key header)", c.rotationCheck)
	}
	if c.minRotation < time.Second {
		return c, fmt.Errorf("--min-rotation-period %s is below the minimum of 1s", c.minRotation)
	}
	if _, err := hsm.ParseProfile(c.wrapProfile); err != nil {
		return c, fmt.Errorf("--pkcs11-wrap: %w", err)
	}
	if c.auditEvery == 0 {
		return c, errors.New("--audit-checkpoint-every must be at least 1")
	}
	if c.unauthRate < 0 || c.unauthBurst < 1 || c.tokenRate < 0 || math.IsNaN(c.unauthRate) || math.IsNaN(c.tokenRate) {
		return c, errors.New("--unauth-rate-limit and --token-rate-limit must be at least 0, --unauth-burst at least 1")
	}
	if c.insecureHTTP && (c.tlsCert != "" || c.tlsKey != "" || c.tlsClientCA != "") {
		return c, errors.New("--insecure-http cannot be combined with --tls-cert, --tls-key or --tls-client-ca")
	}
	if c.insecureHTTP && !tlsutil.IsLoopback(c.addr) {
		return c, fmt.Errorf("--insecure-http is refused on %s: plain HTTP is allowed only on a loopback address (127.0.0.1, ::1, localhost)", c.addr)
	}
	if c.debugAddr != "" && !tlsutil.IsLoopback(c.debugAddr) {
		return c, fmt.Errorf("--debug-addr is refused on %s: the profiling endpoints are served on a loopback address only", c.debugAddr)
	}
	if c.metricsAddr != "" {
		if err := checkHostPort(c.metricsAddr); err != nil {
			return c, fmt.Errorf("--metrics-addr %q must be host:port: %v", c.metricsAddr, err)
		}
		if err := metrics.CheckAddr(c.metricsAddr, c.metricsToken != "" || c.tlsClientCA != ""); err != nil {
			return c, err
		}
		if !tlsutil.IsLoopback(c.metricsAddr) && c.insecureHTTP {
			return c, fmt.Errorf("--metrics-addr %s is off loopback, where metrics are served over TLS only, and --insecure-http turns TLS off", c.metricsAddr)
		}
	} else if c.metricsToken != "" {
		return c, errors.New("--metrics-token-file needs --metrics-addr")
	}
	if (c.tlsCert == "") != (c.tlsKey == "") {
		return c, errors.New("--tls-cert and --tls-key go together")
	}
	if err := checkHostPort(c.addr); err != nil {
		return c, fmt.Errorf("--addr %q (env KMS_ADDR) is kmsd's listen address and must be host:port, e.g. 127.0.0.1:8420: %v", c.addr, err)
	}
	if c.debugAddr != "" {
		if err := checkHostPort(c.debugAddr); err != nil {
			return c, fmt.Errorf("--debug-addr %q must be host:port: %v", c.debugAddr, err)
		}
	}
	if c.auditWALMiB < 1 {
		return c, errors.New("--audit-wal-mib must be at least 1")
	}
	if c.heKeyForm != "seeded" && c.heKeyForm != "full" {
		return c, fmt.Errorf("--he-key-form %q: want seeded or full", c.heKeyForm)
	}
	if c.maxKeysetMiB < 1 || c.asyncKeysetMiB < 1 || c.heGenerations < 1 || c.heWorkers < 0 {
		return c, errors.New("--max-keyset-mib, --async-keyset-mib and --he-generations must be at least 1, --he-workers at least 0")
	}
	return c, nil
}

// envFlag is the flag an environment variable stands for: KMS_AUDIT_WAL_MIB
// for --audit-wal-mib (TestREADMEListsEveryFlag holds every flag to it).
func envFlag(env string) string {
	return strings.ToLower(strings.ReplaceAll(strings.TrimPrefix(env, "KMS_"), "_", "-"))
}

// checkHostPort accepts host:port with a numeric port and a host that is an
// IP address, a DNS name or empty (all interfaces): a URL is refused.
// checkIssuer checks --issuer: an https URL (http to loopback with
// --insecure-http) with no path, query, fragment or credentials (RFC 8414
// 2: the metadata is at the issuer plus the well-known path).
func checkIssuer(raw string, insecure bool) error {
	u, err := url.Parse(raw)
	if err != nil || u.Host == "" || u.User != nil || (u.Path != "" && u.Path != "/") || u.RawQuery != "" || u.Fragment != "" || u.String() != raw {
		return fmt.Errorf("--issuer %q must be https://host[:port], without a path, query or credentials", raw)
	}
	if u.Path == "/" {
		return fmt.Errorf("--issuer %q: leave out the trailing /", raw)
	}
	switch {
	case u.Scheme == "https":
		return nil
	case u.Scheme == "http" && insecure:
		port := u.Port()
		if port == "" {
			port = "80"
		}
		if tlsutil.IsLoopback(net.JoinHostPort(u.Hostname(), port)) {
			return nil
		}
	}
	return fmt.Errorf("--issuer %q must be an https:// URL (plain http only to loopback, with --insecure-http)", raw)
}

func checkHostPort(addr string) error {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return err
	}
	if p, err := strconv.ParseUint(port, 10, 16); err != nil || (p == 0 && port != "0") {
		return fmt.Errorf("port %q is not a number from 0 to 65535", port)
	}
	if host == "" || net.ParseIP(host) != nil {
		return nil
	}
	for _, label := range strings.Split(host, ".") {
		if label == "" || len(label) > 63 {
			return fmt.Errorf("host %q is not an IP address or a DNS name", host)
		}
		for _, r := range label {
			if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-') {
				return fmt.Errorf("host %q is not an IP address or a DNS name", host)
			}
		}
	}
	return nil
}

// checkBeforeDisk checks what the flags name (files to read, addresses to
// listen on) before kmsd creates or changes anything on disk, so a wrong
// setting stops it with nothing written.
func checkBeforeDisk(c config, getenv func(string) string, listens bool) error {
	if err := checkStore(c); err != nil {
		return err
	}
	if err := checkBlobs(c, getenv); err != nil {
		return err
	}
	if err := checkArchive(c); err != nil {
		return err
	}
	switch {
	case c.auditRetain < 0:
		return errors.New("--audit-retain must be positive (or 0: keep every record)")
	case c.auditRetain > 0 && c.auditArchive == "":
		return errors.New("--audit-retain needs --audit-archive: records leave the store only for an archive that holds them")
	}
	if c.module != "" && c.pinFile == "" && getenv("KMS_PKCS11_PIN") == "" {
		return errors.New("no PIN for --pkcs11-module: pass --pkcs11-pin-file or set KMS_PKCS11_PIN")
	}
	if fi, err := os.Stat(c.dataDir); err == nil && !fi.IsDir() {
		return fmt.Errorf("--data-dir %s is not a directory", c.dataDir)
	}
	readable := func(flagName, path string) error {
		if path == "" {
			return nil
		}
		f, err := os.Open(path)
		if err != nil {
			return fmt.Errorf("--%s: %w", flagName, err)
		}
		return f.Close()
	}
	if c.module != "" {
		if err := readable("pkcs11-module", c.module); err != nil {
			return fmt.Errorf("cannot load the PKCS#11 module %s: %w", c.module, err)
		}
	}
	for _, fl := range []struct{ name, path string }{
		{"pkcs11-pin-file", c.pinFile},
		{"tls-cert", c.tlsCert}, {"tls-key", c.tlsKey}, {"tls-client-ca", c.tlsClientCA},
	} {
		if err := readable(fl.name, fl.path); err != nil {
			return err
		}
	}
	if c.tlsCert != "" {
		if _, err := tls.LoadX509KeyPair(c.tlsCert, c.tlsKey); err != nil {
			return fmt.Errorf("--tls-cert/--tls-key: %w", err)
		}
	}
	if c.tlsClientCA != "" {
		if _, err := tlsutil.LoadPool(c.tlsClientCA); err != nil {
			return fmt.Errorf("--tls-client-ca: %w", err)
		}
	}
	if c.auditStream != "" && c.auditStream != "-" {
		if fi, err := os.Stat(filepath.Dir(c.auditStream)); err != nil || !fi.IsDir() {
			return fmt.Errorf("--audit-stream %s: its directory does not exist", c.auditStream)
		}
	}
	// A trial bind: an address in use or not local stops kmsd here rather
	// than after it made a data dir and an admin token. (Not for kmsd
	// restore, which listens on nothing: a drill runs beside the live
	// kmsd, with its settings.)
	if !listens {
		return nil
	}
	if c.metricsToken != "" {
		if _, err := metrics.ReadToken(c.metricsToken); err != nil {
			return err
		}
	}
	// All held open together: two flags naming one address fail here.
	var held []net.Listener
	defer func() {
		for _, ln := range held {
			ln.Close()
		}
	}()
	for _, a := range []struct{ name, addr string }{{"addr", c.addr}, {"debug-addr", c.debugAddr}, {"metrics-addr", c.metricsAddr}} {
		if a.addr == "" {
			continue
		}
		ln, err := net.Listen("tcp", a.addr)
		if err != nil {
			return fmt.Errorf("--%s %s: %w", a.name, a.addr, err)
		}
		held = append(held, ln)
	}
	return nil
}

// newFlagSet defines kmsd's flags into c. An environment variable that
// does not parse is an error parseFlags reports (through envErrs), never a
// silent default.
func newFlagSet(c *config, getenv func(string) string) *flag.FlagSet {
	fs, _ := newFlagSetErrs(c, getenv)
	return fs
}

// envError is an environment variable whose value does not parse.
type envError struct {
	name string
	err  error
}

func newFlagSetErrs(c *config, getenv func(string) string) (*flag.FlagSet, *[]envError) {
	fs := flag.NewFlagSet("kmsd", flag.ContinueOnError)
	var errs []envError
	env := func(name, def string) string {
		if v := getenv(name); v != "" {
			return v
		}
		return def
	}
	parsed := func(name string, parse func(string) error) {
		if v := getenv(name); v != "" {
			if err := parse(v); err != nil {
				errs = append(errs, envError{name, fmt.Errorf("%s=%q: %v", name, v, err)})
			}
		}
	}
	dur := func(name string, def time.Duration) time.Duration {
		parsed(name, func(v string) (err error) { def, err = time.ParseDuration(v); return })
		return def
	}
	fs.StringVar(&c.store, "store", env("KMS_STORE", "bolt"), "bolt: the embedded store, kms.db under --data-dir; etcd: the replicated store on an etcd cluster that several kmsd share (env KMS_STORE)")
	fs.StringVar(&c.etcdEndpoints, "etcd-endpoints", env("KMS_ETCD_ENDPOINTS", ""), "with --store etcd: comma-separated client URLs of the cluster's members; plain http only to loopback (env KMS_ETCD_ENDPOINTS)")
	fs.StringVar(&c.etcdPrefix, "etcd-prefix", env("KMS_ETCD_PREFIX", "/kmsd/"), "with --store etcd: the key prefix kmsd's records live under; replicas of one kmsd share it (env KMS_ETCD_PREFIX)")
	fs.StringVar(&c.etcdCA, "etcd-ca", env("KMS_ETCD_CA", ""), "with --store etcd: CA certificates (PEM) that the members' certificates chain to (env KMS_ETCD_CA)")
	fs.StringVar(&c.etcdCert, "etcd-cert", env("KMS_ETCD_CERT", ""), "with --store etcd: client certificate (PEM) kmsd presents to etcd (env KMS_ETCD_CERT)")
	fs.StringVar(&c.etcdKey, "etcd-key", env("KMS_ETCD_KEY", ""), "with --store etcd: private key of --etcd-cert (PEM) (env KMS_ETCD_KEY)")
	fs.StringVar(&c.s3Endpoint, "s3-endpoint", env("KMS_S3_ENDPOINT", ""), "keep HE blobs (public and evaluation keys) in an S3-compatible bucket at this URL, https://host[:port] (plain http to loopback only), instead of <data-dir>/blobs; replicas on etcd need it for the HE kinds. Credentials: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (env KMS_S3_ENDPOINT)")
	fs.StringVar(&c.s3Bucket, "s3-bucket", env("KMS_S3_BUCKET", ""), "with --s3-endpoint: the bucket, which must exist (env KMS_S3_BUCKET)")
	fs.StringVar(&c.s3Prefix, "s3-prefix", env("KMS_S3_PREFIX", "kmsd/blobs/"), "with --s3-endpoint: objects are named this prefix plus the blob's SHA-256 in hex (env KMS_S3_PREFIX)")
	fs.StringVar(&c.s3Region, "s3-region", env("KMS_S3_REGION", "us-east-1"), "with --s3-endpoint: the region requests are signed for (env KMS_S3_REGION)")
	fs.StringVar(&c.s3CA, "s3-ca", env("KMS_S3_CA", ""), "with --s3-endpoint: CA certificates (PEM) that verify the server; empty: the system's (env KMS_S3_CA)")
	fs.StringVar(&c.dataDir, "data-dir", env("KMS_DATA_DIR", "./data"), "directory for the database, the admin token and the embedded SoftHSM token (env KMS_DATA_DIR)")
	fs.StringVar(&c.addr, "addr", env("KMS_ADDR", "127.0.0.1:8420"), "address to listen on (env KMS_ADDR)")
	fs.StringVar(&c.tlsCert, "tls-cert", env("KMS_TLS_CERT", ""), "server certificate (PEM, the chain after the leaf); empty: a local CA and certificate for localhost made under <data-dir>/tls (env KMS_TLS_CERT)")
	fs.StringVar(&c.tlsKey, "tls-key", env("KMS_TLS_KEY", ""), "private key of --tls-cert (PEM); both are read again on SIGHUP (env KMS_TLS_KEY)")
	fs.StringVar(&c.tlsClientCA, "tls-client-ca", env("KMS_TLS_CLIENT_CA", ""), "require mutual TLS: clients must present a certificate chained to these CA certificates (PEM); refusals are audited (env KMS_TLS_CLIENT_CA)")
	parsed("KMS_INSECURE_HTTP", func(v string) error {
		if v != "1" && v != "0" {
			return errors.New("must be 1 or 0")
		}
		return nil
	})
	fs.BoolVar(&c.insecureHTTP, "insecure-http", getenv("KMS_INSECURE_HTTP") == "1", "serve plain HTTP instead of HTTPS; refused unless --addr is a loopback address (env KMS_INSECURE_HTTP, set to 1)")
	fs.StringVar(&c.debugAddr, "debug-addr", env("KMS_DEBUG_ADDR", ""), "serve Go's profiles and execution traces (/debug/pprof/, unauthenticated) on this loopback address, e.g. 127.0.0.1:8429 (8421 is kmsd-mcp's in README); empty: off (env KMS_DEBUG_ADDR)")
	fs.StringVar(&c.metricsAddr, "metrics-addr", env("KMS_METRICS_ADDR", ""), "serve Prometheus metrics at /metrics on this address, e.g. 127.0.0.1:9420: plain HTTP on a loopback address; off loopback only over TLS with kmsd's certificate and with --metrics-token-file or --tls-client-ca (mutual TLS) protecting it; empty: off (env KMS_METRICS_ADDR)")
	fs.StringVar(&c.metricsToken, "metrics-token-file", env("KMS_METRICS_TOKEN_FILE", ""), "file (mode 600) holding a bearer token of at least 16 characters that scrapers of --metrics-addr must present (Prometheus: authorization.credentials_file) (env KMS_METRICS_TOKEN_FILE)")
	fs.StringVar(&c.module, "pkcs11-module", env("KMS_PKCS11_MODULE", ""), "PKCS#11 library; empty: the embedded SoftHSM2 token under <data-dir>/softhsm (env KMS_PKCS11_MODULE)")
	fs.StringVar(&c.token, "pkcs11-token", env("KMS_PKCS11_TOKEN", "kmsd"), "label of the PKCS#11 token (env KMS_PKCS11_TOKEN)")
	fs.StringVar(&c.pinFile, "pkcs11-pin-file", env("KMS_PKCS11_PIN_FILE", ""), "file holding the token's user PIN; or set KMS_PKCS11_PIN (env KMS_PKCS11_PIN_FILE)")
	fs.StringVar(&c.kekLabel, "kek-label", env("KMS_KEK_LABEL", "kmsd-kek"), "label of the key encryption key in the token (env KMS_KEK_LABEL)")
	fs.StringVar(&c.wrapProfile, "pkcs11-wrap", env("KMS_PKCS11_WRAP", "auto"), "how the KEK protects data keys in the token: auto (the first the token can do of gcm, gcm-hsm-iv, kwp, cbc-hmac), gcm (AES-GCM, IV from kmsd), gcm-hsm-iv (AES-GCM, IV drawn by the HSM: CloudHSM, Luna in FIPS mode), kwp (AES key wrap with padding, RFC 5649) or cbc-hmac (AES-CBC-PAD then HMAC-SHA-256: tokens without GCM) (env KMS_PKCS11_WRAP)")
	fs.DurationVar(&c.cacheTTL, "key-cache-ttl", dur("KMS_KEY_CACHE_TTL", 5*time.Minute), "how long an unsealed private key stays in memory; 0 turns the cache off (env KMS_KEY_CACHE_TTL)")
	fs.DurationVar(&c.destroyInterval, "destroy-check-interval", dur("KMS_DESTROY_CHECK_INTERVAL", time.Minute), "how often versions due for destruction are destroyed (env KMS_DESTROY_CHECK_INTERVAL)")
	fs.DurationVar(&c.minRotation, "min-rotation-period", dur("KMS_MIN_ROTATION_PERIOD", time.Hour), "shortest rotation_period a key's policy may set (env KMS_MIN_ROTATION_PERIOD)")
	fs.DurationVar(&c.rotationCheck, "rotation-check-interval", dur("KMS_ROTATION_CHECK_INTERVAL", time.Minute), "how often keys whose rotation_period elapsed are rotated; one replica does it (env KMS_ROTATION_CHECK_INTERVAL)")
	fs.DurationVar(&c.scrubInterval, "store-scrub-interval", dur("KMS_STORE_SCRUB_INTERVAL", time.Minute), "how often every record's tag and the store digest are checked (also at every start): a record put back or deleted in the store is found within this (env KMS_STORE_SCRUB_INTERVAL)")
	fs.BoolVar(&c.upgradeStore, "upgrade-untagged-store", getenv("KMS_UPGRADE_UNTAGGED_STORE") == "1", "tag the records of a store written by a kmsd from before records had tags (once, at the first start after upgrading kmsd; without it such a store is refused, since a forged one looks the same) (env KMS_UPGRADE_UNTAGGED_STORE, set to 1)")
	fs.DurationVar(&c.shutdownTimeout, "shutdown-timeout", dur("KMS_SHUTDOWN_TIMEOUT", 30*time.Second), "how long SIGTERM waits for requests in flight (env KMS_SHUTDOWN_TIMEOUT)")
	fs.StringVar(&c.logLevel, "log-level", env("KMS_LOG_LEVEL", "info"), "debug, info, warn or error (env KMS_LOG_LEVEL)")
	every := uint64(1000)
	parsed("KMS_AUDIT_CHECKPOINT_EVERY", func(v string) (err error) { every, err = strconv.ParseUint(v, 10, 64); return })
	fs.Uint64Var(&c.auditEvery, "audit-checkpoint-every", every, "sign an audit checkpoint once this many records are uncovered (env KMS_AUDIT_CHECKPOINT_EVERY)")
	fs.DurationVar(&c.auditInterval, "audit-checkpoint-interval", dur("KMS_AUDIT_CHECKPOINT_INTERVAL", 10*time.Second), "and sign one at least this often while any records are uncovered (env KMS_AUDIT_CHECKPOINT_INTERVAL)")
	fs.StringVar(&c.auditStream, "audit-stream", env("KMS_AUDIT_STREAM", ""), "also append each committed audit record as a JSON line to this file, or - for stdout; empty: off (env KMS_AUDIT_STREAM)")
	fs.StringVar(&c.auditArchive, "audit-archive", env("KMS_AUDIT_ARCHIVE", ""), "keep the audit log as a C2SP tlog-tiles log in this directory, or in s3://BUCKET/PREFIX/ on --s3-endpoint: what each checkpoint covers is written there and served under /v1/audit/tiles/; empty: off (env KMS_AUDIT_ARCHIVE)")
	fs.DurationVar(&c.auditRetain, "audit-retain", dur("KMS_AUDIT_RETAIN", 0), "with --audit-archive: prune from the store the audit records older than this once the archive holds them durably (they are then read from the archive), so the store stops growing; 0: keep every record in the store (env KMS_AUDIT_RETAIN)")
	fs.DurationVar(&c.auditStreamWait, "audit-stream-timeout", dur("KMS_AUDIT_STREAM_TIMEOUT", 100*time.Millisecond), "longest a request waits for a stuck stream sink before the record is dropped from the stream (env KMS_AUDIT_STREAM_TIMEOUT)")
	intEnv := func(name string, def int) int {
		parsed(name, func(v string) (err error) { def, err = strconv.Atoi(v); return })
		return def
	}
	fs.Int64Var(&c.auditWALMiB, "audit-wal-mib", int64(intEnv("KMS_AUDIT_WAL_MIB", 16)), "size of the audit write-ahead log <data-dir>/kms.db-audit-wal, preallocated at start: records wait there (durable) until they move into kms.db (env KMS_AUDIT_WAL_MIB)")
	fs.Int64Var(&c.maxKeysetMiB, "max-keyset-mib", int64(intEnv("KMS_MAX_KEYSET_MIB", 4096)), "refuse HE keys whose keyset (public and evaluation keys) would be larger than this many MiB (env KMS_MAX_KEYSET_MIB)")
	fs.Int64Var(&c.asyncKeysetMiB, "async-keyset-mib", int64(intEnv("KMS_ASYNC_KEYSET_MIB", 64)), "HE keysets larger than this many MiB are generated in the background: create and rotate answer 202 with an operation to poll (env KMS_ASYNC_KEYSET_MIB)")
	fs.IntVar(&c.heGenerations, "he-generations", intEnv("KMS_HE_GENERATIONS", 1), "HE keyset generations at once; more are refused with 429 (env KMS_HE_GENERATIONS)")
	fs.StringVar(&c.issuer, "issuer", env("KMS_ISSUER", ""), "kmsd's URL as clients reach it, https://host[:port], named as the OAuth issuer in /.well-known/oauth-authorization-server (MCP clients find the token endpoint there); empty: the listen address when it names one host (env KMS_ISSUER)")
	fs.DurationVar(&c.oauthTTL, "oauth-token-ttl", dur("KMS_OAUTH_TOKEN_TTL", kms.DefaultAccessTokenTTL), "lifetime of an access token issued at "+api.TokenEndpoint+" (client credentials), from 1m to 24h, never past its client token (env KMS_OAUTH_TOKEN_TTL)")
	fs.DurationVar(&c.maxTokenTTL, "max-token-ttl", dur("KMS_MAX_TOKEN_TTL", 90*24*time.Hour), "longest lifetime of a token created through the API, and the lifetime of one created without a ttl; 0: no maximum, tokens without a ttl do not expire (env KMS_MAX_TOKEN_TTL)")
	floatEnv := func(name string, def float64) float64 {
		parsed(name, func(v string) (err error) { def, err = strconv.ParseFloat(v, 64); return })
		return def
	}
	fs.Float64Var(&c.unauthRate, "unauth-rate-limit", floatEnv("KMS_UNAUTH_RATE_LIMIT", 5), "requests per second each client address may make without a valid token (anonymous or failed authentication); past it 429, summarized in one audit record per address and minute; 0: no limit (env KMS_UNAUTH_RATE_LIMIT)")
	fs.IntVar(&c.unauthBurst, "unauth-burst", intEnv("KMS_UNAUTH_BURST", 50), "burst allowed above --unauth-rate-limit (env KMS_UNAUTH_BURST)")
	fs.Float64Var(&c.tokenRate, "token-rate-limit", floatEnv("KMS_TOKEN_RATE_LIMIT", 0), "requests per second each token may make, in bursts of twice that; past it 429; 0: no limit (env KMS_TOKEN_RATE_LIMIT)")
	fs.StringVar(&c.peersFile, "peers", env("KMS_PEERS", ""), "JSON file of the kmsd nodes this one shares threshold HE keys with: {\"self\": NAME, \"peers\": [{\"name\", \"url\", \"identity\", \"ca_cert\"}]} (README: Threshold keys); empty: none (env KMS_PEERS)")
	fs.StringVar(&c.heKeyForm, "he-key-form", env("KMS_HE_KEY_FORM", "seeded"), "how new HE public and evaluation keys are stored and served: seeded (each key's b halves and the seed of its a halves, half the bytes; the SDK and kmsd-mcp expand them, ?form=full serves them expanded) or full (for clients whose SDK predates seeded keys) (env KMS_HE_KEY_FORM)")
	fs.IntVar(&c.heWorkers, "he-workers", intEnv("KMS_HE_WORKERS", 0), "goroutines per HE keyset generation; 0: one per core (env KMS_HE_WORKERS)")
	return fs, &errs
}

// run starts kmsd and blocks until ctx ends, then drains and closes. ready,
// if set, is called with the listening address.
func run(ctx context.Context, args []string, getenv func(string) string, stderr io.Writer, ready func(addr string)) error {
	if len(args) == 1 && (args[0] == "--version" || args[0] == "-version" || args[0] == "version") {
		return errVersion // before anything is checked: it needs no setting
	}
	c, err := parseFlags(args, getenv)
	if err != nil {
		return err
	}
	var level slog.Level
	if err := level.UnmarshalText([]byte(c.logLevel)); err != nil {
		return fmt.Errorf("--log-level: %w", err)
	}
	if err := checkBeforeDisk(c, getenv, true); err != nil {
		return err
	}
	log := slog.New(slog.NewJSONHandler(stderr, &slog.HandlerOptions{Level: level}))
	// SIGHUP reloads the TLS certificate; it must never stop kmsd.
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer func() { signal.Stop(hup); close(hup) }() // ends the reload loop

	if err := os.MkdirAll(c.dataDir, 0o700); err != nil {
		return fmt.Errorf("data dir: %w", err)
	}
	if err := pqc.SelfTest(); err != nil {
		return err
	}

	// The store first: its file lock makes a second kmsd on the same data
	// dir fail fast, before it touches the HSM.
	conn, err := connectStore(c, log)
	if err != nil {
		return err
	}
	defer conn.Close()

	// The store remembers the token and the KEK it was sealed under. Only a
	// brand-new data dir gets a new embedded token and a new KEK; any other
	// start finds exactly those, or stops naming what is missing. Read
	// before the HSM is open, so before the record's tag can be checked:
	// it only picks the HSM key, and is checked once the store is open.
	peeked, empty, err := conn.Peek("sealed-under")
	if err != nil {
		return err
	}
	sealedUnder, err := parseKEKRef(peeked)
	if err != nil {
		return err
	}
	fresh := false
	if sealedUnder == nil {
		fresh = empty
	} else if sealedUnder.Token != c.token || sealedUnder.Label != c.kekLabel {
		return fmt.Errorf("this data dir was sealed under the key labelled %q in token %q (KEK id %s), but kmsd was started with --pkcs11-token %q --kek-label %q: start it with those", sealedUnder.Label, sealedUnder.Token, sealedUnder.ID, c.token, c.kekLabel)
	}
	sealer, err := openSealer(c, sealedUnder, fresh, log, getenv)
	if err != nil {
		return err
	}
	defer sealer.Close()
	st, err := conn.Open(sealer)
	if err != nil {
		return err
	}
	defer st.Close()
	if checked, err := st.Meta("sealed-under"); err != nil {
		return err
	} else if !bytes.Equal(checked, peeked) {
		return errors.New("the store's record of its KEK changed between two reads at start (another kmsd starting on an empty store?); start again")
	}
	if sealedUnder != nil && sealedUnder.ID != sealer.KEKID() {
		return fmt.Errorf("HSM: the key labelled %q in token %q has id %s, but this data dir was sealed under the KEK with id %s (another token or KEK of the same name?); refusing to start", c.kekLabel, c.token, sealer.KEKID(), sealedUnder.ID)
	}
	if sealedUnder == nil {
		b, _ := json.Marshal(kekRef{Token: c.token, Label: c.kekLabel, ID: sealer.KEKID()})
		got, err := st.ClaimMeta("sealed-under", b)
		if err != nil {
			return fmt.Errorf("record the KEK in the store: %w", err)
		}
		if !bytes.Equal(got, b) {
			// Another replica started on the same empty store at the same
			// time and recorded its KEK first: this one's seals nothing.
			var other kekRef
			_ = json.Unmarshal(got, &other)
			return fmt.Errorf("another kmsd started on this store at the same time and recorded its KEK first (id %s, labelled %q in token %q); the KEK this one made seals nothing: remove %s and start again with --pkcs11-module and --pkcs11-pin-file of the token that holds that KEK (start the first replica alone)", other.ID, other.Label, other.Token, c.dataDir)
		}
	}
	log.Info("HSM ready", "token", c.token, "kek_label", c.kekLabel, "kek_id", sealer.KEKID(), "wrap_profile", string(sealer.Profile()), "new_data_dir", fresh)

	ttl := c.cacheTTL
	if ttl == 0 {
		ttl = -1
	}
	// The audit log cannot be turned off by configuration. This
	// environment variable exists only so BENCHMARKS.md can measure what
	// auditing costs, in the same binary.
	audited := getenv("KMSD_BENCHMARK_UNAUDITED") != "1"
	if !audited {
		log.Warn("AUDIT LOG OFF: KMSD_BENCHMARK_UNAUDITED=1 is for benchmarks only; requests are not recorded")
	}
	tokenPath := filepath.Join(c.dataDir, "admin.token")
	// HE keys keep their public and evaluation keys as blobs: in a local
	// directory by default, or in an S3 bucket (--s3-endpoint), which
	// replicas share. A local directory is not shared, so on etcd without
	// S3 the HE kinds are not offered (creating one is refused as an
	// unknown kind).
	blobDir := filepath.Join(c.dataDir, "blobs")
	blobs, err := openBlobs(ctx, c, getenv)
	if err != nil {
		return err
	}
	arch, err := openArchive(ctx, c, getenv)
	if err != nil {
		return err
	}
	if arch != nil {
		log.Info("audit archive", "at", arch.String())
		if _, dir := arch.(archive.Dir); dir && st.Shared() {
			log.Warn("audit archive: a directory on a replicated store: the replica that leads archiving writes to its own; give the replicas one shared directory or s3://")
		}
	}
	var orphanGrace time.Duration
	switch {
	case blobs != nil:
		blobDir, orphanGrace = "", s3OrphanGrace
		log.Info("HE blobs: s3", "endpoint", c.s3Endpoint, "bucket", c.s3Bucket, "prefix", c.s3Prefix)
	case st.Shared():
		blobDir = ""
		log.Warn("store etcd: HE key kinds (ckks, bgv) are not offered: their blobs need a store the replicas share (--s3-endpoint)")
	}
	var peers *api.Peers
	if c.peersFile != "" {
		pc, err := api.LoadPeerConfig(c.peersFile)
		if err == nil {
			peers, err = api.NewPeers(pc)
		}
		if err != nil {
			return fmt.Errorf("--peers: %w", err)
		}
		log.Info("threshold peers", "self", pc.Self, "peers", peers.Names())
	}
	cfg := app.Config{
		Peers: peers,
		Store: st, AuditStore: st.Audit(), Sealer: sealer, BlobDir: blobDir, Blobs: blobs, OrphanGrace: orphanGrace,
		HEWorkers: c.heWorkers, HEFullKeys: c.heKeyForm == "full", Logger: log,
		Service: kms.Config{CacheTTL: ttl, MaxTokenTTL: c.maxTokenTTL,
			MaxKeysetBytes: c.maxKeysetMiB << 20, MaxGenerations: c.heGenerations, AsyncKeysetBytes: c.asyncKeysetMiB << 20,
			MinRotationPeriod: c.minRotation, RotationCheckInterval: c.rotationCheck},
		Unaudited: !audited, AuditEvery: c.auditEvery, AuditInterval: c.auditInterval,
		API: api.Options{UnauthRate: c.unauthRate, UnauthBurst: c.unauthBurst, TokenRate: c.tokenRate,
			OAuth: api.OAuthOptions{Issuer: c.issuer, AccessTokenTTL: c.oauthTTL}},
		DestroyInterval: c.destroyInterval,
		Lead:            st.Lead,
		Archive:         arch,
		ArchiveProgress: st,
		AuditRetain:     c.auditRetain,
		AdminToken: func(tok string) error {
			if tok == "" {
				return os.Remove(tokenPath) // another replica made the first token
			}
			return fileutil.WriteAtomic(tokenPath, []byte(tok+"\n"), 0o600)
		},
	}
	if c.auditStream != "" {
		var w io.Writer = os.Stdout
		if c.auditStream != "-" {
			f, err := os.OpenFile(c.auditStream, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
			if err != nil {
				return fmt.Errorf("audit stream: %w", err)
			}
			defer f.Close()
			w = f
		}
		stream := audit.NewStream(w, c.auditStreamWait, 4096, log)
		defer stream.Close()
		cfg.API.Stream = stream
	}
	var metricsToken string
	if c.metricsAddr != "" {
		if c.metricsToken != "" {
			if metricsToken, err = metrics.ReadToken(c.metricsToken); err != nil {
				return err
			}
		}
		cfg.Metrics = metrics.New("kmsd")
	}
	a, err := app.New(ctx, cfg)
	if err != nil {
		return err
	}
	if a.AdminTokenMade {
		log.Info("wrote the bootstrap admin token", "path", tokenPath)
	}
	if c.auditRetain == 0 {
		logGrowth(ctx, st.Audit(), log)
	}
	go store.ScrubEvery(ctx, st, c.scrubInterval, log)
	apiSrv := a.API
	var tlsCfg *tls.Config
	var reloader *tlsutil.Reloader
	var clientCAs *x509.CertPool
	if !c.insecureHTTP {
		certFile, keyFile := c.tlsCert, c.tlsKey
		if certFile == "" {
			local, err := tlsutil.EnsureLocal(filepath.Join(c.dataDir, "tls"), localHosts(c.addr), time.Now())
			if err != nil {
				return fmt.Errorf("TLS: %w", err)
			}
			certFile, keyFile = local.Cert, local.Key
			if local.CreatedCA {
				log.Info("made a local CA for TLS: clients trust it with --ca-cert / KMS_CA_CERT", "ca", local.CA)
			}
			if local.Issued {
				log.Info("issued the local server certificate", "cert", local.Cert, "hosts", localHosts(c.addr))
			}
		}
		reloader, err = tlsutil.NewReloader(certFile, keyFile)
		if err != nil {
			return fmt.Errorf("TLS: %w", err)
		}
		if c.tlsClientCA != "" {
			if clientCAs, err = tlsutil.LoadPool(c.tlsClientCA); err != nil {
				return fmt.Errorf("--tls-client-ca: %w", err)
			}
		}
		tlsCfg = tlsutil.ServerConfig(reloader, clientCAs, apiSrv.RecordTLSRefusal)
		go func() {
			for range hup {
				if err := reloader.Reload(); err != nil {
					log.Error("SIGHUP: TLS certificate not reloaded; the previous one stays in use", "err", err)
					continue
				}
				leaf := reloader.Leaf()
				log.Info("SIGHUP: TLS certificate reloaded", "subject", leaf.Subject.String(), "not_after", leaf.NotAfter, "serial", leaf.SerialNumber.Text(16))
			}
		}()
	} else {
		log.Warn("PLAIN HTTP: --insecure-http serves without TLS, on a loopback address only")
	}

	ln, err := net.Listen("tcp", c.addr)
	if err != nil {
		return err
	}
	if c.debugAddr != "" {
		dln, err := net.Listen("tcp", c.debugAddr)
		if err != nil {
			return err
		}
		dsrv := &http.Server{Handler: debugHandler(), ReadHeaderTimeout: 10 * time.Second}
		defer dsrv.Close()
		go dsrv.Serve(dln)
		log.Warn("profiling endpoints served without authentication", "url", "http://"+dln.Addr().String()+"/debug/pprof/")
	}
	if c.metricsAddr != "" {
		mln, err := net.Listen("tcp", c.metricsAddr)
		if err != nil {
			return err
		}
		mux := http.NewServeMux()
		mux.Handle("GET /metrics", cfg.Metrics.Handler(metricsToken))
		msrv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second, ReadTimeout: 30 * time.Second, MaxHeaderBytes: 16 << 10,
			ErrorLog: slog.NewLogLogger(log.Handler(), slog.LevelWarn)}
		defer msrv.Close()
		mscheme := "http"
		if tlsutil.IsLoopback(c.metricsAddr) {
			go msrv.Serve(mln)
		} else {
			// Off loopback: TLS with kmsd's certificate, so the bearer
			// token never travels in clear, and with --tls-client-ca
			// the scraper's certificate is required as for the API.
			mscheme, msrv.TLSConfig = "https", tlsutil.ServerConfig(reloader, clientCAs, nil)
			go msrv.ServeTLS(mln, "", "")
		}
		log.Info("metrics", "url", mscheme+"://"+mln.Addr().String()+"/metrics", "bearer_token", metricsToken != "")
	}
	if c.issuer == "" {
		if host, _, _ := net.SplitHostPort(c.addr); host != "" && !net.ParseIP(host).IsUnspecified() {
			scheme := "https"
			if c.insecureHTTP {
				scheme = "http"
			}
			apiSrv.SetIssuer(scheme + "://" + ln.Addr().String())
		} else {
			log.Warn("no OAuth issuer: --addr names no one host; give --issuer https://host:port for MCP clients to find the token endpoint")
		}
	}
	srv := &http.Server{
		Handler:           apiSrv.Handler(),
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       60 * time.Second,
		IdleTimeout:       120 * time.Second,
		MaxHeaderBytes:    64 << 10,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
		TLSConfig:         tlsCfg,
	}
	// Background work (checkpoints, destruction, refusal summaries) stops
	// after requests drained and before the store and the HSM close; the
	// last checkpoint and the token uses are written down then.
	a.Start()
	defer a.Close()

	errc := make(chan error, 1)
	scheme := "https"
	if tlsCfg != nil {
		go func() { errc <- srv.ServeTLS(ln, "", "") }()
	} else {
		scheme = "http"
		go func() { errc <- srv.Serve(ln) }()
	}
	log.Info("listening", "addr", ln.Addr().String(), "url", scheme+"://"+ln.Addr().String(), "tls", tlsCfg != nil, "mutual_tls", c.tlsClientCA != "")
	if ready != nil {
		ready(ln.Addr().String())
	}
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	log.Info("shutting down: draining requests")
	sctx, cancel := context.WithTimeout(context.Background(), c.shutdownTimeout)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil {
		log.Warn("shutdown", "err", err)
	}
	log.Info("stopped", st.Stats()...)
	return nil
}

// localHosts are the names the local server certificate covers: localhost,
// 127.0.0.1 and ::1, and the host of the listen address when it names one.
func localHosts(addr string) []string {
	hosts := slices.Clone(tlsutil.LocalHosts)
	if h, _, err := net.SplitHostPort(addr); err == nil && h != "" && h != "0.0.0.0" && h != "::" && !slices.Contains(hosts, h) {
		hosts = append(hosts, h)
	}
	return hosts
}

// openSealer opens the HSM: the embedded SoftHSM token under the data dir
// (made when fresh) or --pkcs11-module's, and the KEK sealedUnder names
// (nil: the one labelled --kek-label, made when fresh).
func openSealer(c config, sealedUnder *kekRef, fresh bool, log *slog.Logger, getenv func(string) string) (*hsm.Sealer, error) {
	var err error
	hcfg := hsm.Config{Module: c.module, TokenLabel: c.token, KEKLabel: c.kekLabel, CreateKEK: fresh, Logger: log, Profile: hsm.Profile(c.wrapProfile)}
	if sealedUnder != nil {
		hcfg.KEKID = sealedUnder.ID // the store's KEK, whatever else bears its label
	}
	pinFile := c.pinFile
	if c.module == "" {
		st, err := softhsm.Bootstrap(filepath.Join(c.dataDir, "softhsm"), c.token, fresh)
		if err != nil {
			return nil, fmt.Errorf("embedded SoftHSM: %w", err)
		}
		hcfg.Module = st.Module
		if pinFile == "" {
			pinFile = st.PINFile
		}
		if st.ConfUpdated {
			log.Info("embedded SoftHSM: softhsm2.conf now names the data dir's token directory by its absolute path (the data dir moved, or was first given relative to another working directory)", "conf", st.Conf)
		}
		log.Info("embedded SoftHSM token", "module", st.Module, "conf", st.Conf, "token", c.token)
	}
	switch {
	case pinFile != "":
		if hcfg.PIN, err = softhsm.ReadPIN(pinFile); err != nil {
			return nil, fmt.Errorf("PIN file: %w", err)
		}
	case getenv("KMS_PKCS11_PIN") != "":
		hcfg.PIN = getenv("KMS_PKCS11_PIN")
	default:
		return nil, errors.New("no PIN: pass --pkcs11-pin-file or set KMS_PKCS11_PIN")
	}
	sealer, err := hsm.Open(hcfg)
	if err != nil {
		if sealedUnder != nil && errors.Is(err, hsm.ErrKEKMissing) {
			return nil, fmt.Errorf("HSM: this data dir was sealed under the KEK with id %s, labelled %q in token %q, and the token holds no such key (another token or KEK of the same name?); refusing to start: %w", sealedUnder.ID, c.kekLabel, c.token, err)
		}
		return nil, fmt.Errorf("HSM: %w", err)
	}
	return sealer, nil
}

// kekRef is the token and the KEK a data dir's secrets are sealed under,
// as the store remembers them.
type kekRef struct {
	Token string `json:"token"`
	Label string `json:"label"`
	ID    string `json:"id"`
}

func parseKEKRef(b []byte) (*kekRef, error) {
	if b == nil {
		return nil, nil
	}
	var r kekRef
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, fmt.Errorf("the store's record of its KEK does not decode: %w", err)
	}
	return &r, nil
}

// debugHandler serves net/http/pprof's endpoints only (not the default mux,
// which other packages could add to).
func debugHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	return mux
}
