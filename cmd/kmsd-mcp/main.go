// Command kmsd-mcp is an MCP server that computes on CKKS ciphertexts with
// the evaluation keys of keys held in kmsd (tools he_describe, he_linear,
// he_polynomial, he_aggregate, he_similarity; each served key's manifest
// as a resource). Without --http it speaks MCP on stdin and stdout; with
// --http, streamable HTTP at /mcp, where every client presents a bearer
// token that kmsd's introspection vouches for.
package main

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/modelcontextprotocol/go-sdk/mcp"

	"github.com/kmsd-project/kmsd/api/client"
	"github.com/kmsd-project/kmsd/api/client/hekeys"
	"github.com/kmsd-project/kmsd/hemcp"
	"github.com/kmsd-project/kmsd/internal/metrics"
	"github.com/kmsd-project/kmsd/internal/tlsutil"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	err := run(ctx, os.Args[1:], os.Getenv, os.Stdin, os.Stdout, os.Stderr, nil)
	if errors.Is(err, flag.ErrHelp) {
		os.Exit(0)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "kmsd-mcp: %v\n", err)
		os.Exit(1)
	}
}

type keyList []string

func (k *keyList) String() string { return strings.Join(*k, ",") }
func (k *keyList) Set(v string) error {
	*k = append(*k, v)
	return nil
}

type config struct {
	kmsURL, caCert, tokenFile, identityFile, httpAddr, cacheDir, modelsFile, contextFile, logLevel string
	metricsAddr, metricsToken                                                                      string
	maxCalls                                                                                       int64
	tlsCert, tlsKey, publicURL                                                                     string
	authServer                                                                                     string
	stateless                                                                                      bool
	noGaloisOnDemand                                                                               bool
	allowedOrigins, allowedHosts                                                                   keyList
	allowUnbound                                                                                   bool
	sessionTimeout                                                                                 time.Duration
	maxLoadedVersions                                                                              int64
	stallTimeout                                                                                   time.Duration
	keys                                                                                           keyList
	refresh, introspectTTL                                                                         time.Duration
	maxRequestMiB                                                                                  int64
}

func parseFlags(args []string, getenv func(string) string, out io.Writer) (config, error) {
	var c config
	fs := flag.NewFlagSet("kmsd-mcp", flag.ContinueOnError)
	fs.SetOutput(out)
	env := func(name, def string) string {
		if v := getenv(name); v != "" {
			return v
		}
		return def
	}
	var errs []error
	dur := func(name string, def time.Duration) time.Duration {
		if v := getenv(name); v != "" {
			d, err := time.ParseDuration(v)
			if err != nil {
				errs = append(errs, fmt.Errorf("%s=%q: %v", name, v, err))
			}
			return d
		}
		return def
	}
	fs.StringVar(&c.kmsURL, "kms-url", env("KMSD_MCP_KMS_URL", "https://127.0.0.1:8420"), "kmsd's URL: https://, or plain http:// to a loopback address only (env KMSD_MCP_KMS_URL)")
	fs.StringVar(&c.caCert, "ca-cert", env("KMSD_MCP_CA_CERT", ""), "CA certificate (PEM) to trust for kmsd, e.g. <data-dir>/tls/ca.pem; empty: system roots (env KMSD_MCP_CA_CERT)")
	fs.StringVar(&c.tokenFile, "token-file", env("KMSD_MCP_TOKEN_FILE", ""), "file holding this server's own evaluator token (it reads keys, introspects its clients' tokens and has kmsd attest its results); or set KMSD_MCP_TOKEN (never a flag value) (env KMSD_MCP_TOKEN_FILE)")
	fs.StringVar(&c.identityFile, "identity-key-file", env("KMSD_MCP_IDENTITY_KEY_FILE", ""), "kmsd's identity public key (base64, from GET /v1/identity), pinned: manifests must be signed by it (required) (env KMSD_MCP_IDENTITY_KEY_FILE)")
	fs.Var(&c.keys, "key", "a ckks key to serve; repeat for more (env KMSD_MCP_KEY, comma-separated)")
	fs.StringVar(&c.httpAddr, "http", env("KMSD_MCP_HTTP", ""), "serve streamable HTTP at /mcp on this address, e.g. 127.0.0.1:8421: a loopback address over plain HTTP, any address over HTTPS (--tls-cert); empty: stdio (env KMSD_MCP_HTTP)")
	fs.StringVar(&c.tlsCert, "tls-cert", env("KMSD_MCP_TLS_CERT", ""), "serve HTTPS (TLS 1.3, X25519MLKEM768 first) with this certificate (PEM, the chain after the leaf); read again on SIGHUP (env KMSD_MCP_TLS_CERT)")
	fs.StringVar(&c.tlsKey, "tls-key", env("KMSD_MCP_TLS_KEY", ""), "private key of --tls-cert (PEM) (env KMSD_MCP_TLS_KEY)")
	fs.BoolVar(&c.allowUnbound, "allow-unbound-tokens", getenv("KMSD_MCP_ALLOW_UNBOUND_TOKENS") == "1", "accept client tokens bound to no audience; by default a token must be bound to this server's canonical URL (kmsctl tokens create --audience URL), so that a token made for another service is refused (env KMSD_MCP_ALLOW_UNBOUND_TOKENS, set to 1)")
	fs.StringVar(&c.publicURL, "public-url", env("KMSD_MCP_PUBLIC_URL", ""), "this server's canonical URL, https://host[:port]/mcp, as clients reach it (behind a proxy, say); empty: from --http (env KMSD_MCP_PUBLIC_URL)")
	fs.StringVar(&c.authServer, "authorization-server", env("KMSD_MCP_AUTHORIZATION_SERVER", ""), "the OAuth issuer clients get tokens for this server from, named in the protected-resource metadata: kmsd's URL as clients reach it; empty: the issuer kmsd names at --kms-url (env KMSD_MCP_AUTHORIZATION_SERVER)")
	fs.BoolVar(&c.noGaloisOnDemand, "no-galois-on-demand", getenv("KMSD_MCP_NO_GALOIS_ON_DEMAND") == "1", "never ask kmsd to generate a Galois key a version lacks: make rotations from the powers of two it has, or refuse (by default kmsd is asked, within the key's on_demand_galois_keys) (env KMSD_MCP_NO_GALOIS_ON_DEMAND, set to 1)")
	fs.BoolVar(&c.stateless, "stateless", getenv("KMSD_MCP_STATELESS") == "1", "serve every HTTP request on its own, without MCP sessions, so that instances behind one address serve the same client (no GET stream, no server-to-client requests) (env KMSD_MCP_STATELESS, set to 1)")
	fs.Var(&c.allowedOrigins, "allowed-origin", "a browser origin (https://host[:port]) whose requests are served besides this server's own; repeat for more; requests with another Origin header are refused (env KMSD_MCP_ALLOWED_ORIGINS, comma-separated)")
	fs.Var(&c.allowedHosts, "allowed-host", "a Host header (host:port) served besides the --public-url's and the listen address's, e.g. the name a proxy forwards with; repeat for more; requests for another host are refused (env KMSD_MCP_ALLOWED_HOSTS, comma-separated)")
	fs.StringVar(&c.cacheDir, "cache-dir", env("KMSD_MCP_CACHE_DIR", ""), "verified blobs by digest (default: the user cache dir, kmsd-mcp) (env KMSD_MCP_CACHE_DIR)")
	fs.DurationVar(&c.refresh, "refresh", dur("KMSD_MCP_REFRESH", 30*time.Second), "how often each key is polled for rotations and state changes (env KMSD_MCP_REFRESH)")
	fs.DurationVar(&c.introspectTTL, "introspect-ttl", dur("KMSD_MCP_INTROSPECT_TTL", 10*time.Second), "how long kmsd's answer about a client token is kept; a revoked token works at most this long (env KMSD_MCP_INTROSPECT_TTL)")
	fs.StringVar(&c.modelsFile, "models", env("KMSD_MCP_MODELS", ""), "JSON file of named linear models for he_linear: {\"name\": {\"weights\": [[...]], \"bias\": [...]}} (env KMSD_MCP_MODELS)")
	fs.StringVar(&c.contextFile, "context", env("KMSD_MCP_CONTEXT", ""), "JSON file of named context embeddings for he_similarity: {\"name\": {\"ids\": [...], \"embeddings\": [[...]]}} (env KMSD_MCP_CONTEXT)")
	num := func(name string, def int64) int64 {
		if v := getenv(name); v != "" {
			n, err := strconv.ParseInt(v, 10, 64)
			if err != nil {
				errs = append(errs, fmt.Errorf("%s=%q: not a whole number", name, v))
			}
			return n
		}
		return def
	}
	fs.Int64Var(&c.maxRequestMiB, "max-request-mib", num("KMSD_MCP_MAX_REQUEST_MIB", 16), "largest MCP message over HTTP or stdio, in MiB (a logN 15 ciphertext is a few MiB) (env KMSD_MCP_MAX_REQUEST_MIB)")
	fs.Int64Var(&c.maxCalls, "max-calls", num("KMSD_MCP_MAX_CALLS", int64(2*runtime.NumCPU())), "evaluations at once; a tool call past them is refused as busy (default twice the cores) (env KMSD_MCP_MAX_CALLS)")
	fs.DurationVar(&c.sessionTimeout, "session-timeout", dur("KMSD_MCP_SESSION_TIMEOUT", 30*time.Minute), "an MCP session idle this long is ended (env KMSD_MCP_SESSION_TIMEOUT)")
	fs.Int64Var(&c.maxLoadedVersions, "max-loaded-versions", num("KMSD_MCP_MAX_LOADED_VERSIONS", 2), "key versions kept loaded besides each key's primary, over all keys; past it the least recently used is dropped and loads again, from the blob cache, when a call needs it (env KMSD_MCP_MAX_LOADED_VERSIONS)")
	fs.DurationVar(&c.stallTimeout, "download-stall-timeout", dur("KMSD_MCP_DOWNLOAD_STALL_TIMEOUT", hekeys.DefaultStallTimeout), "a request to kmsd for keys that gets no byte for this long fails, and the call waiting for it (a download resumes where it stopped) (env KMSD_MCP_DOWNLOAD_STALL_TIMEOUT)")
	fs.StringVar(&c.metricsAddr, "metrics-addr", env("KMSD_MCP_METRICS_ADDR", ""), "serve Prometheus metrics at /metrics (plain HTTP) on this loopback address, e.g. 127.0.0.1:9421; empty: off (env KMSD_MCP_METRICS_ADDR)")
	fs.StringVar(&c.metricsToken, "metrics-token-file", env("KMSD_MCP_METRICS_TOKEN_FILE", ""), "file (mode 600) holding a bearer token of at least 16 characters that scrapers of --metrics-addr must present (env KMSD_MCP_METRICS_TOKEN_FILE)")
	fs.StringVar(&c.logLevel, "log-level", env("KMSD_MCP_LOG_LEVEL", "info"), "debug, info, warn or error; JSON logs on stderr (env KMSD_MCP_LOG_LEVEL)")
	if v := getenv("KMSD_MCP_KEY"); v != "" {
		for _, k := range strings.Split(v, ",") {
			if k = strings.TrimSpace(k); k != "" {
				c.keys = append(c.keys, k)
			}
		}
	}
	if v := getenv("KMSD_MCP_MAX_REQUEST_MIB"); v != "" {
		if _, err := fmt.Sscan(v, &c.maxRequestMiB); err != nil {
			errs = append(errs, fmt.Errorf("KMSD_MCP_MAX_REQUEST_MIB=%q: not a number", v))
		}
	}
	for _, l := range []struct {
		env  string
		list *keyList
	}{{"KMSD_MCP_ALLOWED_ORIGINS", &c.allowedOrigins}, {"KMSD_MCP_ALLOWED_HOSTS", &c.allowedHosts}} {
		for _, v := range strings.Split(getenv(l.env), ",") {
			if v = strings.TrimSpace(v); v != "" {
				*l.list = append(*l.list, v)
			}
		}
	}
	envOrigins, envHosts := len(c.allowedOrigins), len(c.allowedHosts)
	envKeys := len(c.keys)
	if err := fs.Parse(args); err != nil {
		return c, err
	}
	if len(c.keys) > envKeys && envKeys > 0 {
		c.keys = c.keys[envKeys:] // flags win over the environment
	}
	if len(c.allowedOrigins) > envOrigins && envOrigins > 0 {
		c.allowedOrigins = c.allowedOrigins[envOrigins:]
	}
	if len(c.allowedHosts) > envHosts && envHosts > 0 {
		c.allowedHosts = c.allowedHosts[envHosts:]
	}
	for _, o := range c.allowedOrigins {
		u, err := url.Parse(o)
		if err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" || u.Path != "" || u.User != nil || u.RawQuery != "" || u.Fragment != "" || u.String() != o {
			return c, fmt.Errorf("--allowed-origin %q must be an origin, scheme://host[:port]", o)
		}
	}
	for _, h := range c.allowedHosts {
		if _, _, err := net.SplitHostPort(h); err != nil {
			return c, fmt.Errorf("--allowed-host %q must be host:port", h)
		}
	}
	if c.authServer != "" {
		u, err := url.Parse(c.authServer)
		if err != nil || u.Scheme != "https" || u.Host == "" || u.Path != "" || u.User != nil || u.RawQuery != "" || u.Fragment != "" || u.String() != c.authServer ||
			strings.ContainsAny(c.authServer, "\"\\ {}<>") {
			return c, errors.New("--authorization-server must be kmsd's https:// URL as clients reach it, without a path, e.g. https://kms.example.net:8420")
		}
	}
	if c.introspectTTL > 5*time.Minute {
		return c, fmt.Errorf("--introspect-ttl %s is over 5m: a revoked token works at kmsd-mcp for up to this long", c.introspectTTL)
	}
	if fs.NArg() > 0 {
		return c, fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	if len(errs) > 0 {
		return c, errs[0]
	}
	if err := checkKMSURL(c.kmsURL); err != nil {
		return c, err
	}
	switch {
	case len(c.keys) == 0:
		return c, errors.New("give at least one --key NAME")
	case c.identityFile == "":
		return c, errors.New("--identity-key-file is required: kmsd-mcp checks every manifest against the pinned identity key")
	case c.metricsAddr != "" && !tlsutil.IsLoopback(c.metricsAddr):
		return c, fmt.Errorf("--metrics-addr %s is refused: kmsd-mcp serves metrics on a loopback address only", c.metricsAddr)
	case c.metricsToken != "" && c.metricsAddr == "":
		return c, errors.New("--metrics-token-file needs --metrics-addr")
	case c.refresh <= 0 || c.introspectTTL <= 0 || c.maxRequestMiB < 1 || c.maxCalls < 1 || c.sessionTimeout < time.Second:
		return c, errors.New("--refresh and --introspect-ttl must be positive, --max-request-mib and --max-calls at least 1, --session-timeout at least 1s")
	case c.maxLoadedVersions < 0 || c.maxLoadedVersions > 1000 || c.stallTimeout <= 0:
		return c, errors.New("--max-loaded-versions must be from 0 to 1000, --download-stall-timeout positive")
	case (c.tlsCert == "") != (c.tlsKey == ""):
		return c, errors.New("--tls-cert and --tls-key go together")
	case c.tlsCert != "" && c.httpAddr == "":
		return c, errors.New("--tls-cert needs --http")
	case c.httpAddr != "" && c.tlsCert == "" && !tlsutil.IsLoopback(c.httpAddr):
		return c, fmt.Errorf("--http %s is refused: plain HTTP is served on a loopback address only; give --tls-cert and --tls-key to serve HTTPS on it", c.httpAddr)
	}
	if c.publicURL != "" {
		u, err := url.Parse(c.publicURL)
		if err != nil || u.Scheme != "https" || u.Host == "" || u.User != nil || u.RawQuery != "" || u.Fragment != "" ||
			u.String() != c.publicURL || strings.ContainsAny(c.publicURL, "\"\\ {}<>") {
			return c, errors.New("--public-url must be an https:// URL without credentials, query, fragment or characters that need escaping, e.g. https://mcp.example.net/mcp")
		}
	} else if c.httpAddr != "" && !tlsutil.IsLoopback(c.httpAddr) {
		// The canonical URL is what clients' tokens are bound to: a
		// wildcard listen address names no server.
		return c, errors.New("--public-url is required off loopback: the URL clients reach this server at, which their tokens are bound to (e.g. https://mcp.example.net:8421/mcp)")
	}
	return c, nil
}

// run starts kmsd-mcp; ready, if set, is called with the HTTP address.
func run(ctx context.Context, args []string, getenv func(string) string, stdin io.Reader, stdout, stderr io.Writer, ready func(string)) error {
	c, err := parseFlags(args, getenv, stderr)
	if err != nil {
		return err
	}
	var level slog.Level
	if err := level.UnmarshalText([]byte(c.logLevel)); err != nil {
		return fmt.Errorf("--log-level: %w", err)
	}
	log := slog.New(slog.NewJSONHandler(stderr, &slog.HandlerOptions{Level: level}))
	token := strings.TrimSpace(getenv("KMSD_MCP_TOKEN"))
	if c.tokenFile != "" {
		b, err := os.ReadFile(c.tokenFile)
		if err != nil {
			return fmt.Errorf("--token-file: %w", err)
		}
		token = strings.TrimSpace(string(b))
	}
	if token == "" {
		return errors.New("no token: give --token-file or set KMSD_MCP_TOKEN (an evaluator token for the served keys)")
	}
	idb, err := os.ReadFile(c.identityFile)
	if err != nil {
		return fmt.Errorf("--identity-key-file: %w", err)
	}
	identity, err := base64.StdEncoding.DecodeString(strings.TrimSpace(string(idb)))
	if err != nil {
		return errors.New("--identity-key-file does not hold standard base64")
	}
	tlsCfg, err := client.TLSConfig(c.caCert, "", "")
	if err != nil {
		return fmt.Errorf("--ca-cert: %w", err)
	}
	kc, err := client.New(c.kmsURL, token, client.WithTLS(tlsCfg))
	if err != nil {
		return fmt.Errorf("--kms-url: %w", err)
	}
	if c.cacheDir == "" {
		base, err := os.UserCacheDir()
		if err != nil {
			base = os.TempDir()
		}
		c.cacheDir = filepath.Join(base, "kmsd-mcp")
	}
	hc := *kc.HTTPClient()
	hc.Timeout = 0 // keysets are large: a stall (--download-stall-timeout) or ctx ends the fetch
	var mm *mcpMetrics
	var mreg *metrics.Registry
	var metricsToken string
	if c.metricsAddr != "" {
		if c.metricsToken != "" {
			if metricsToken, err = metrics.ReadToken(c.metricsToken); err != nil {
				return err
			}
		}
		mreg = metrics.New("kmsd_mcp")
		mm = newMCPMetrics(mreg)
	}
	cfg := hemcp.Config{Client: kc, Fetcher: &hekeys.Fetcher{BaseURL: c.kmsURL, Token: token, IdentityKey: identity, CacheDir: c.cacheDir, HTTP: &hc},
		Keys: c.keys, Refresh: c.refresh, IntrospectTTL: c.introspectTTL, MaxRequestBytes: c.maxRequestMiB << 20, Logger: log,
		MaxCalls: int(c.maxCalls), SessionTimeout: c.sessionTimeout, AllowUnbound: c.allowUnbound,
		AuthorizationServer: c.authServer, Stateless: c.stateless, AllowedOrigins: c.allowedOrigins, NoGaloisOnDemand: c.noGaloisOnDemand}
	cfg.Fetcher.StallTimeout = c.stallTimeout
	cfg.MaxLoadedVersions = int(c.maxLoadedVersions)
	if c.maxLoadedVersions == 0 {
		cfg.MaxLoadedVersions = -1 // none but the primaries
	}
	if c.httpAddr != "" && cfg.AuthorizationServer == "" {
		// The issuer kmsd names: clients get this server's tokens there.
		mctx, mcancel := context.WithTimeout(ctx, 10*time.Second)
		meta, err := kc.AuthServerMetadata(mctx)
		mcancel()
		if err == nil && meta.Issuer != "" {
			cfg.AuthorizationServer = meta.Issuer
		} else {
			log.Warn("kmsd names no OAuth issuer (start it with --issuer, or give --authorization-server): the protected-resource metadata names no authorization server, so clients cannot find where to get tokens", "err", err)
		}
	}
	if mm != nil {
		cfg.Metrics = mm
	}
	if err := readJSONFile(c.modelsFile, &cfg.Models); err != nil {
		return fmt.Errorf("--models: %w", err)
	}
	if err := readJSONFile(c.contextFile, &cfg.Contexts); err != nil {
		return fmt.Errorf("--context: %w", err)
	}
	if mreg != nil {
		mln, err := net.Listen("tcp", c.metricsAddr)
		if err != nil {
			return fmt.Errorf("--metrics-addr: %w", err)
		}
		mux := http.NewServeMux()
		mux.Handle("GET /metrics", mreg.Handler(metricsToken))
		msrv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
		defer msrv.Close()
		go msrv.Serve(mln)
		log.Info("metrics", "url", "http://"+mln.Addr().String()+"/metrics", "bearer_token", metricsToken != "")
	}
	start := time.Now()
	s, err := hemcp.New(ctx, cfg)
	if err != nil {
		return err
	}
	log.Info("keys ready", "keys", c.keys, "seconds", time.Since(start).Seconds(), "cache_dir", c.cacheDir)
	rctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go s.Refresh(rctx)
	go renewLoop(rctx, kc, token, log, mm)

	if c.httpAddr == "" {
		t := &mcp.IOTransport{Reader: io.NopCloser(stdin), Writer: nopWriteCloser{stdout}, MaxLineLength: int(c.maxRequestMiB << 20)}
		err := s.MCPServer().Run(ctx, t)
		if ctx.Err() != nil || errors.Is(err, io.EOF) {
			return nil
		}
		return err
	}
	var reloader *tlsutil.Reloader
	if c.tlsCert != "" {
		if reloader, err = tlsutil.NewReloader(c.tlsCert, c.tlsKey); err != nil {
			return fmt.Errorf("--tls-cert/--tls-key: %w", err)
		}
		hup := make(chan os.Signal, 1)
		signal.Notify(hup, syscall.SIGHUP)
		defer signal.Stop(hup)
		go func() {
			for range hup {
				if err := reloader.Reload(); err != nil {
					log.Error("SIGHUP: TLS certificate not reloaded; the previous one stays in use", "err", err)
					continue
				}
				log.Info("SIGHUP: TLS certificate reloaded", "subject", reloader.Leaf().Subject.String())
			}
		}()
	}
	ln, err := net.Listen("tcp", c.httpAddr)
	if err != nil {
		return err
	}
	scheme := "http"
	if reloader != nil {
		scheme = "https"
	}
	canonical := c.publicURL
	if canonical == "" {
		canonical = scheme + "://" + ln.Addr().String() + "/mcp"
	}
	s.SetResource(canonical)
	s.SetHosts(servedHosts(canonical, ln.Addr().String(), c.allowedHosts))
	// No ReadTimeout: it would end the long-lived SSE streams of GET /mcp;
	// headers have 10 s, an idle connection two minutes, a session
	// --session-timeout, a body --max-request-mib.
	srv := &http.Server{Handler: s.HTTPHandler(), ReadHeaderTimeout: 10 * time.Second, IdleTimeout: 2 * time.Minute, MaxHeaderBytes: 64 << 10,
		ErrorLog: slog.NewLogLogger(log.Handler(), slog.LevelWarn)}
	log.Info("listening", "url", scheme+"://"+ln.Addr().String()+"/mcp", "resource", canonical, "tls", reloader != nil)
	if ready != nil {
		ready(ln.Addr().String())
	}
	errc := make(chan error, 1)
	if reloader != nil {
		srv.TLSConfig = tlsutil.ServerConfig(reloader, nil, nil)
		go func() { errc <- srv.ServeTLS(ln, "", "") }()
	} else {
		go func() { errc <- srv.Serve(ln) }()
	}
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	sctx, scancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer scancel()
	return srv.Shutdown(sctx)
}

// servedHosts are the Host headers kmsd-mcp answers: the canonical URL's
// host (with and without its default port), the listen address, the
// loopback names of a loopback port, and those given.
func servedHosts(canonical, listen string, extra []string) []string {
	out := append([]string{listen}, extra...)
	if u, err := url.Parse(canonical); err == nil {
		out = append(out, u.Host)
		def := map[string]string{"https": "443", "http": "80"}[u.Scheme]
		if u.Port() == "" {
			out = append(out, net.JoinHostPort(u.Hostname(), def))
		} else if u.Port() == def {
			out = append(out, u.Hostname())
		}
	}
	if _, port, err := net.SplitHostPort(listen); err == nil && tlsutil.IsLoopback(listen) {
		out = append(out, "localhost:"+port, "127.0.0.1:"+port, "[::1]:"+port)
	}
	return out
}

type nopWriteCloser struct{ io.Writer }

func (nopWriteCloser) Close() error { return nil }

func readJSONFile(path string, v any) error {
	if path == "" {
		return nil
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	dec := json.NewDecoder(strings.NewReader(string(b)))
	dec.DisallowUnknownFields()
	return dec.Decode(v)
}

// renewLoop keeps kmsd-mcp's own token alive: it renews it (POST
// /v1/tokens/self/renew) when two thirds of its lifetime have passed,
// until it reaches the maximum lifetime it was made with, and says so in
// the log. A token that does not expire, or that is not renewable, is
// left as it is (the log says when it expires).
func renewLoop(ctx context.Context, kc *client.Client, token string, log *slog.Logger, mm *mcpMetrics) {
	in, err := kc.IntrospectToken(ctx, token)
	if err != nil || !in.Active {
		log.Warn("token renewal: cannot read this server's own token", "err", err)
		return
	}
	if in.Exp == 0 {
		return // never expires
	}
	exp := time.Unix(in.Exp, 0)
	if mm != nil {
		mm.expiry.Set(float64(in.Exp))
		mm.ttl.Set(time.Until(exp).Seconds())
	}
	// The first renewal at two thirds of what is left; then at two
	// thirds of the ttl each renewal gives.
	next := time.Now().Add(time.Until(exp) * 2 / 3)
	retry := time.Second
	for {
		select {
		case <-ctx.Done():
			return
		case <-time.After(time.Until(next)):
		}
		t, err := kc.RenewToken(ctx)
		switch {
		case err == nil && t.ExpiresAt != nil:
			ttl, _ := time.ParseDuration(t.TTL)
			log.Info("token renewed", "token_id", t.ID, "expires_at", t.ExpiresAt.UTC().Format(time.RFC3339), "max_expires_at", t.MaxExpiresAt)
			if ttl <= 0 {
				ttl = time.Until(*t.ExpiresAt)
			}
			exp, next, retry = *t.ExpiresAt, time.Now().Add(ttl*2/3), time.Second
			mm.renewed("ok", exp, ttl)
		case client.StatusOf(err) == 409:
			mm.renewed("refused", time.Time{}, 0)
			log.Error("token renewal: refused; give kmsd-mcp a new token before this one expires", "expires_at", exp.UTC().Format(time.RFC3339), "err", err)
			return
		case ctx.Err() != nil:
			return
		default:
			mm.renewed("error", time.Time{}, 0)
			log.Warn("token renewal failed; retrying", "err", err, "retry_in", retry.String())
			next = time.Now().Add(retry)
			retry = min(2*retry, 30*time.Second)
		}
	}
}

// checkKMSURL refuses a kmsd URL that would send the server's token in
// clear off the machine (plain http to a host that is not loopback), or
// that carries credentials (which would reach logs).
func checkKMSURL(raw string) error {
	u, err := url.Parse(raw)
	if err == nil && u.User != nil {
		// Not echoed: it holds a password.
		return errors.New("--kms-url carries credentials: give kmsd-mcp its token with --token-file or KMSD_MCP_TOKEN")
	}
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || u.RawQuery != "" || u.Fragment != "" {
		return fmt.Errorf("--kms-url: %q is not an http:// or https:// URL of kmsd", raw)
	}
	port := u.Port()
	if port == "" {
		port = "80"
	}
	if u.Scheme == "http" && !tlsutil.IsLoopback(net.JoinHostPort(u.Hostname(), port)) {
		return fmt.Errorf("--kms-url: %q is plain HTTP to a host that is not loopback: kmsd-mcp's token and every ciphertext would cross the network in clear; use https://", raw)
	}
	return nil
}
