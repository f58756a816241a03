package hemcp

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"runtime"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/modelcontextprotocol/go-sdk/auth"
	"github.com/modelcontextprotocol/go-sdk/mcp"
	"github.com/tuneinsight/lattigo/v6/core/rlwe"
	"golang.org/x/sync/singleflight"
	"golang.org/x/time/rate"

	"github.com/kmsd-project/kmsd/api/client"
	"github.com/kmsd-project/kmsd/api/client/hekeys"
	"github.com/kmsd-project/kmsd/kms/wire"
)

// Config is what kmsd-mcp is started with.
type Config struct {
	Client          *client.Client // kmsd, with the server's own evaluator token
	Fetcher         *hekeys.Fetcher
	Keys            []string      // the keys served
	Refresh         time.Duration // how often each key is polled for rotations and state changes
	Models          map[string]Model
	Contexts        map[string]Corpus
	IntrospectTTL   time.Duration // how long an introspection answer is kept
	MaxRequestBytes int64
	// MaxCalls bounds the tool calls evaluating at once (a call past it
	// is refused as busy, at once); default twice the cores.
	MaxCalls int
	// SessionTimeout ends an MCP session idle this long (default 30m).
	SessionTimeout time.Duration
	// MaxLoadedVersions bounds the engines of versions other than the
	// keys' primaries, over all keys: past it, the least recently used is
	// dropped (it loads again, from the blob cache, when a call needs
	// it). Zero: 2; negative: none but the primaries.
	MaxLoadedVersions int
	// IntrospectRate bounds, per client address, the requests per second
	// whose token is not in the introspection cache (each costs a
	// question to kmsd and a record in its audit log), in bursts of
	// IntrospectBurst; past it, 429. Zero: 5 and 20.
	IntrospectRate  float64
	IntrospectBurst int
	// AllowUnbound accepts tokens bound to no audience over HTTP; by
	// default a client's token must be bound to this server's canonical
	// URL (RFC 8707), so that a token made for another service is refused.
	AllowUnbound bool
	// AuthorizationServer is the issuer clients get tokens from (kmsd's
	// URL, RFC 8414), named in the protected-resource metadata; "" names
	// none.
	AuthorizationServer string
	// Stateless serves each HTTP request on its own (the MCP stateless
	// mode): no session to keep, so instances behind one address serve
	// the same client; no server-to-client requests, no GET stream.
	Stateless bool
	// AllowedOrigins are the browser origins (scheme://host[:port]) whose
	// requests are served besides this server's own; a request with any
	// other Origin is refused (403) before its token is looked at.
	AllowedOrigins []string
	// NoGaloisOnDemand: a rotation whose Galois key the version lacks is
	// made from the powers of two it has (or refused), instead of kmsd
	// being asked to generate the key (POST .../evaluation-keys, within
	// the key's on_demand_galois_keys).
	NoGaloisOnDemand bool
	Logger           *slog.Logger
	// Metrics, if set, is told of tool calls, introspections and key
	// fetches.
	Metrics Metrics
}

// Metrics is told of what the server does (kmsd-mcp's Prometheus
// metrics). Labels are bounded: tool is one of the server's tools.
type Metrics interface {
	// ToolCall is one call of a tool: outcome ok, tool_error (the tool
	// refused the input, or kmsd refused it something), busy (refused:
	// MaxCalls evaluations running) or panic.
	ToolCall(tool, outcome string, d time.Duration)
	// Introspection is one client token checked: from the cache (cached)
	// or asked of kmsd.
	Introspection(cached bool)
	// KeyFetch is one key version's keys fetched from kmsd and verified
	// (err nil) or not.
	KeyFetch(d time.Duration, err error)
}

// nopMetrics is Metrics that records nothing.
type nopMetrics struct{}

func (nopMetrics) ToolCall(string, string, time.Duration) {}
func (nopMetrics) Introspection(bool)                     {}
func (nopMetrics) KeyFetch(time.Duration, error)          {}

// Model is a named linear model: y = W·x + b.
type Model struct {
	Weights [][]float64 `json:"weights"`
	Bias    []float64   `json:"bias,omitempty"`
}

// Corpus is a named set of plaintext context embeddings the server holds
// for he_similarity.
type Corpus struct {
	IDs        []string    `json:"ids"`
	Embeddings [][]float64 `json:"embeddings"`
}

// Server serves the configured keys' tools over MCP.
type Server struct {
	cfg         Config
	log         *slog.Logger
	mu          sync.RWMutex
	served      map[string]*servedKey
	introMu     sync.Mutex
	intro       map[[32]byte]introEntry // sha256(token) -> kmsd's answer, at most maxIntro
	introFlight singleflight.Group
	srcMu       sync.Mutex
	sources     map[string]*rate.Limiter // per client address, for tokens not in the cache
	calls       chan struct{}            // a slot per tool call evaluating (Config.MaxCalls)
	clock       atomic.Int64             // ticks at each use of an engine (loaded.used)
	loadMu      sync.Mutex
	loading     map[versionRef]*loadFlight // the loads under way, one per version
	// resource is this server's canonical URL (RFC 9728
	// protected-resource metadata, the audience of its clients' tokens);
	// "" until SetResource.
	resource string
	// hosts are the Host headers served (SetHosts; none set: any).
	hosts map[string]bool
}

type servedKey struct {
	name     string
	etag     string
	primary  uint64
	enabled  map[uint64]bool
	engines  map[uint64]*loaded
	loadedAt time.Time
}

// loaded is a version's engine and when it was last used.
type loaded struct {
	eng  *Engine
	used atomic.Int64 // Server.clock at its last use
}

type versionRef struct {
	key     string
	version uint64
}

// loadFlight is a load of a version's keys that the calls needing it
// wait for; it is cancelled when the last of them gives up.
type loadFlight struct {
	done   chan struct{}
	eng    *Engine
	err    error
	refs   int // calls waiting for it
	cancel context.CancelFunc
}

type introEntry struct {
	info *client.Introspection
	at   time.Time
}

// New fetches and verifies every configured key's primary version; a key
// that cannot be served stops it with the reason.
func New(ctx context.Context, cfg Config) (*Server, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Refresh <= 0 {
		cfg.Refresh = 30 * time.Second
	}
	if cfg.IntrospectTTL <= 0 {
		cfg.IntrospectTTL = 10 * time.Second
	}
	if cfg.MaxRequestBytes <= 0 {
		cfg.MaxRequestBytes = 16 << 20
	}
	if cfg.MaxCalls <= 0 {
		cfg.MaxCalls = 2 * runtime.NumCPU()
	}
	if cfg.SessionTimeout <= 0 {
		cfg.SessionTimeout = 30 * time.Minute
	}
	switch {
	case cfg.MaxLoadedVersions == 0:
		cfg.MaxLoadedVersions = 2
	case cfg.MaxLoadedVersions < 0:
		cfg.MaxLoadedVersions = 0
	}
	if cfg.IntrospectRate <= 0 {
		cfg.IntrospectRate = 5
	}
	if cfg.IntrospectBurst <= 0 {
		cfg.IntrospectBurst = 20
	}
	if cfg.Metrics == nil {
		cfg.Metrics = nopMetrics{}
	}
	if len(cfg.Keys) == 0 {
		return nil, errors.New("no keys to serve: give --key NAME")
	}
	s := &Server{cfg: cfg, log: cfg.Logger, served: map[string]*servedKey{}, intro: map[[32]byte]introEntry{}, calls: make(chan struct{}, cfg.MaxCalls),
		loading: map[versionRef]*loadFlight{}}
	for _, name := range cfg.Keys {
		if err := wire.ValidateName(name); err != nil {
			return nil, fmt.Errorf("--key %q: %v", name, err)
		}
		s.served[name] = &servedKey{name: name, enabled: map[uint64]bool{}, engines: map[uint64]*loaded{}}
		if err := s.refresh(ctx, name); err != nil {
			return nil, fmt.Errorf("key %s: %w", name, err)
		}
	}
	if err := s.checkConfig(); err != nil {
		return nil, err
	}
	return s, nil
}

// checkConfig holds the server's models and contexts to the caps of the
// versions served: one that no call could use (past the caps of every
// primary version) stops the server.
func (s *Server) checkConfig() error {
	var slots []int
	s.mu.RLock()
	for _, sk := range s.served {
		if l := sk.engines[sk.primary]; l != nil && !slices.Contains(slots, l.eng.Slots()) {
			slots = append(slots, l.eng.Slots())
		}
	}
	s.mu.RUnlock()
	sort.Sort(sort.Reverse(sort.IntSlice(slots)))
	// fits is nil if the matrix is within the caps of some version.
	fits := func(what string, W [][]float64) error {
		rows, cols, total := matrixShape(W)
		var first error
		for _, sl := range slots {
			err := capsFor(sl).check(what, rows, cols, total)
			if err == nil {
				return nil
			}
			if first == nil {
				first = err
			}
		}
		return first
	}
	for _, name := range sortedKeys(s.cfg.Models) {
		m, ok := s.cfg.Models[name]
		if !ok {
			continue
		}
		rows := len(m.Weights)
		if err := fits("the weights", m.Weights); err != nil {
			return fmt.Errorf("model %q: %w", name, err)
		}
		if m.Bias != nil && len(m.Bias) != rows {
			return fmt.Errorf("model %q: the bias has %d values, the weights %d rows", name, len(m.Bias), rows)
		}
	}
	for _, name := range sortedKeys(s.cfg.Contexts) {
		c, ok := s.cfg.Contexts[name]
		if !ok {
			continue
		}
		rows := len(c.Embeddings)
		if err := fits("the embeddings", c.Embeddings); err != nil {
			return fmt.Errorf("context %q: %w", name, err)
		}
		if len(c.IDs) != rows {
			return fmt.Errorf("context %q: %d ids for %d embeddings", name, len(c.IDs), rows)
		}
	}
	return nil
}

// refresh polls kmsd for a key (If-None-Match): a new primary is fetched,
// verified and made ready; versions no longer enabled are dropped.
func (s *Server) refresh(ctx context.Context, name string) error {
	s.mu.RLock()
	etag := s.served[name].etag
	s.mu.RUnlock()
	k, newTag, err := s.cfg.Client.GetKeyIfChanged(ctx, name, wire.MaxVersionsPage, etag)
	if err != nil {
		return err
	}
	if k == nil {
		return nil // unchanged
	}
	if k.Kind != "ckks" {
		return fmt.Errorf("key %s is %s: kmsd-mcp computes on ckks keys", name, k.Kind)
	}
	enabled := map[uint64]bool{}
	for _, v := range k.Versions {
		if v.State == "enabled" && v.Version >= k.MinDecryptionVersion {
			enabled[v.Version] = true
		}
	}
	s.mu.RLock()
	_, have := s.served[name].engines[k.PrimaryVersion]
	s.mu.RUnlock()
	var eng *Engine
	if !have && enabled[k.PrimaryVersion] {
		if eng, err = s.loadShared(ctx, name, k.PrimaryVersion); err != nil {
			return err
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	sk := s.served[name]
	sk.etag, sk.primary, sk.enabled = newTag, k.PrimaryVersion, enabled
	if eng != nil && sk.engines[k.PrimaryVersion] == nil {
		l := &loaded{eng: eng}
		l.used.Store(s.clock.Add(1))
		sk.engines[k.PrimaryVersion] = l
		s.log.Info("serving key version", "key", name, "version", k.PrimaryVersion, "primary", true)
	}
	for v := range sk.engines {
		if !enabled[v] {
			delete(sk.engines, v)
			s.log.Info("stopped serving key version: not enabled in kmsd", "key", name, "version", v)
		}
	}
	s.evictLocked()
	return nil
}

// evictLocked drops the least recently used engines of versions that are
// not their key's primary, past Config.MaxLoadedVersions of them. s.mu
// is held.
func (s *Server) evictLocked() {
	for {
		var others int
		var oldest *servedKey
		var oldestV uint64
		var oldestUse int64
		for _, sk := range s.served {
			for v, l := range sk.engines {
				if v == sk.primary {
					continue
				}
				others++
				if u := l.used.Load(); oldest == nil || u < oldestUse {
					oldest, oldestV, oldestUse = sk, v, u
				}
			}
		}
		if others <= s.cfg.MaxLoadedVersions {
			return
		}
		delete(oldest.engines, oldestV)
		s.log.Info("unloaded key version: least recently used past --max-loaded-versions; it loads again on demand", "key", oldest.name, "version", oldestV)
	}
}

// loadShared loads a version's engine once for all the calls that need
// it at the same time (each would otherwise hold a copy of its keys: most
// of a GiB at logN 15). A call gives up when its own ctx ends; the load is
// cancelled when every call waiting for it has. An enabled version's
// engine is kept (and the least recently used others dropped).
func (s *Server) loadShared(ctx context.Context, name string, version uint64) (*Engine, error) {
	ref := versionRef{name, version}
	s.loadMu.Lock()
	f := s.loading[ref]
	if f == nil {
		lctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
		f = &loadFlight{done: make(chan struct{}), cancel: cancel}
		s.loading[ref] = f
		go func() {
			defer cancel()
			eng, err := s.load(lctx, name, version)
			s.loadMu.Lock()
			if s.loading[ref] == f {
				delete(s.loading, ref)
			}
			s.loadMu.Unlock()
			if err == nil {
				s.mu.Lock()
				if sk := s.served[name]; sk.enabled[version] && sk.engines[version] == nil {
					l := &loaded{eng: eng}
					l.used.Store(s.clock.Add(1))
					sk.engines[version] = l
					s.log.Info("serving key version", "key", name, "version", version, "primary", version == sk.primary)
					s.evictLocked()
				}
				s.mu.Unlock()
			}
			f.eng, f.err = eng, err
			close(f.done)
		}()
	}
	f.refs++
	s.loadMu.Unlock()
	select {
	case <-f.done:
		return f.eng, f.err
	case <-ctx.Done():
		s.loadMu.Lock()
		if f.refs--; f.refs == 0 {
			f.cancel()
			if s.loading[ref] == f {
				delete(s.loading, ref)
			}
		}
		s.loadMu.Unlock()
		return nil, fmt.Errorf("gave up waiting for the keys of %s version %d: %w", name, version, ctx.Err())
	}
}

func (s *Server) load(ctx context.Context, name string, version uint64) (*Engine, error) {
	start := time.Now()
	// The public and relinearization keys now; each Galois key when a
	// tool first needs it.
	keys, err := s.cfg.Fetcher.FetchLazy(ctx, name, version)
	s.cfg.Metrics.KeyFetch(time.Since(start), err)
	if err != nil {
		return nil, err
	}
	return NewLazyEngine(keys, func(ctx context.Context, rotations []int) ([]*rlwe.GaloisKey, error) {
		if s.cfg.NoGaloisOnDemand {
			// Only what the version lists; the rest from powers of two.
			listed := keys.GaloisRefs()
			rotations = slices.DeleteFunc(slices.Clone(rotations), func(r int) bool {
				_, ok := listed[keys.GaloisElement(r)]
				return !ok
			})
		}
		return s.cfg.Fetcher.GaloisKeys(ctx, keys, rotations, false, !s.cfg.NoGaloisOnDemand)
	})
}

// Refresh polls every key every Config.Refresh until ctx ends.
func (s *Server) Refresh(ctx context.Context) {
	t := time.NewTicker(s.cfg.Refresh)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			for _, name := range s.cfg.Keys {
				if err := s.refresh(ctx, name); err != nil && ctx.Err() == nil {
					s.log.Warn("refresh failed; serving what was loaded", "key", name, "err", err)
				}
			}
		}
	}
}

// engine is the engine of a served key version, loading an enabled older
// version on first use. Before anything is loaded the envelope's
// parameters are checked against the version's (its verified manifest)
// and then check runs (the attestation): a version is never loaded for a
// ciphertext of other parameters or without provenance.
func (s *Server) engine(ctx context.Context, env *client.Envelope, check func() error) (*Engine, error) {
	name, version := env.Key, env.Version
	s.mu.RLock()
	sk, ok := s.served[name]
	var l *loaded
	var enabled bool
	if ok {
		l, enabled = sk.engines[version], sk.enabled[version]
	}
	s.mu.RUnlock()
	switch {
	case !ok:
		return nil, fmt.Errorf("this server does not serve key %q (he_describe lists the keys it serves that your token may use)", name)
	case l != nil:
		l.used.Store(s.clock.Add(1))
		eng := l.eng
		if eng.Keys.Manifest.ParamsID != env.ParamsID {
			return nil, otherParams(env, eng.Keys.Manifest.ParamsID)
		}
		if err := check(); err != nil {
			return nil, err
		}
		return eng, nil
	case !enabled:
		return nil, fmt.Errorf("version %d of key %q is not enabled in kmsd (disabled, retired by min_decryption_version, scheduled for destruction, destroyed, or not yet seen: the server polls every %s)", version, name, s.cfg.Refresh)
	}
	m, err := s.cfg.Fetcher.Manifest(ctx, name, version)
	if err != nil {
		return nil, err
	}
	if m.ParamsID != env.ParamsID {
		return nil, otherParams(env, m.ParamsID)
	}
	if err := check(); err != nil {
		return nil, err
	}
	return s.loadShared(ctx, name, version)
}

// otherParams says that env was made under other parameters than its
// version's (has).
func otherParams(env *client.Envelope, has string) error {
	return fmt.Errorf("the ciphertext was made under parameters %s, but version %d of %q has %s", env.ParamsID, env.Version, env.Key, has)
}

// EnvelopeJSON is a ciphertext envelope as the tools take and give it.
type EnvelopeJSON struct {
	Key        string  `json:"key" jsonschema:"the kmsd key the ciphertext is under"`
	Version    uint64  `json:"version" jsonschema:"the key version"`
	ParamsID   string  `json:"params_id" jsonschema:"sha256 of the CKKS parameters literal"`
	Level      int     `json:"level" jsonschema:"the ciphertext's level"`
	Scale      float64 `json:"scale" jsonschema:"the ciphertext's scale"`
	Slots      int     `json:"slots" jsonschema:"how many slots hold values"`
	Ciphertext string  `json:"ciphertext" jsonschema:"the Lattigo ciphertext, standard base64"`
	// Attestation is kmsd's signed statement of where the ciphertext
	// comes from; the tools refuse a ciphertext without one.
	Attestation *AttestationJSON `json:"attestation,omitempty" jsonschema:"kmsd's attestation of the ciphertext (kmsctl he encrypt adds it; results carry theirs): pass it on unchanged"`
}

// AttestationJSON is an attestation as the tools take and give it (the
// same JSON as wire.Attestation, with its schema's binary fields as
// base64 strings).
type AttestationJSON struct {
	Payload   string `json:"payload" jsonschema:"the statement kmsd signed, standard base64"`
	Signature string `json:"signature" jsonschema:"kmsd's ML-DSA-65 signature, standard base64"`
	SignedBy  uint64 `json:"signed_by" jsonschema:"the identity key's version"`
}

// envelope checks the fields as hekeys.ParseEnvelope does (the SDK has
// already decoded the JSON strictly against the tool's schema) without
// encoding megabytes of base64 again.
func (ej EnvelopeJSON) envelope() (*client.Envelope, error) {
	ct, err := base64.StdEncoding.DecodeString(ej.Ciphertext)
	if err != nil {
		return nil, wire.Errorf(wire.KindInvalid, "not a ciphertext envelope: ciphertext is not standard base64")
	}
	e := &client.Envelope{Key: ej.Key, Version: ej.Version, ParamsID: ej.ParamsID, Level: ej.Level, Scale: ej.Scale, Slots: ej.Slots, Ciphertext: ct}
	if a := ej.Attestation; a != nil {
		payload, err1 := base64.StdEncoding.DecodeString(a.Payload)
		sig, err2 := base64.StdEncoding.DecodeString(a.Signature)
		if err1 != nil || err2 != nil {
			return nil, wire.Errorf(wire.KindInvalid, "not a ciphertext envelope: the attestation's payload and signature must be standard base64")
		}
		e.Attestation = &wire.Attestation{Payload: payload, Signature: sig, SignedBy: a.SignedBy}
	}
	if err := e.Check(hekeys.MaxEnvelopeCiphertext); err != nil {
		return nil, err
	}
	return e, nil
}

func fromEnvelope(e *client.Envelope) EnvelopeJSON {
	ej := EnvelopeJSON{Key: e.Key, Version: e.Version, ParamsID: e.ParamsID, Level: e.Level, Scale: e.Scale, Slots: e.Slots, Ciphertext: base64.StdEncoding.EncodeToString(e.Ciphertext)}
	if a := e.Attestation; a != nil {
		ej.Attestation = &AttestationJSON{Payload: base64.StdEncoding.EncodeToString(a.Payload), Signature: base64.StdEncoding.EncodeToString(a.Signature), SignedBy: a.SignedBy}
	}
	return ej
}

// open checks an envelope strictly, the caller's right to its key, that it
// is under a served, enabled version of the same parameters, its
// attestation (kmsd's signature, covering this ciphertext: the server
// computes only on attested inputs), and its ciphertext; it returns the
// engine and the ciphertext.
func (s *Server) open(ctx context.Context, req *mcp.CallToolRequest, ej EnvelopeJSON) (*Engine, *rlwe.Ciphertext, *client.Envelope, error) {
	env, err := ej.envelope()
	if err != nil {
		return nil, nil, nil, err
	}
	if err := allowed(req, env.Key); err != nil {
		return nil, nil, nil, err
	}
	eng, err := s.engine(ctx, env, func() error {
		_, err := hekeys.VerifyAttestation(s.cfg.Fetcher.IdentityKey, env)
		return err
	})
	if err != nil {
		return nil, nil, nil, err
	}
	ct, err := eng.Keys.Open(env)
	if err != nil {
		return nil, nil, nil, err
	}
	return eng, ct, env, nil
}

// allowed refuses a key outside the patterns of the HTTP caller's token.
// On stdio there is no token: the process that started the server is its
// one client, and the server's configuration decides.
func allowed(req *mcp.CallToolRequest, key string) error {
	if req == nil {
		return nil
	}
	return allowedExtra(req.Extra, key)
}

// allowedExtra is allowed for any request's extra (a resource read's).
func allowedExtra(extra *mcp.RequestExtra, key string) error {
	if extra == nil || extra.TokenInfo == nil {
		return nil
	}
	patterns, _ := extra.TokenInfo.Extra["keys"].([]string)
	if !wire.MayUse(patterns, key) {
		return fmt.Errorf("your token may not use key %q", key)
	}
	return nil
}

// Tool inputs and outputs.
type (
	DescribeIn  struct{}
	DescribeOut struct {
		Keys  []KeyInfo         `json:"keys"`
		Tools map[string]string `json:"tools"`
	}
	KeyInfo struct {
		Name     string        `json:"name"`
		Primary  uint64        `json:"primary_version"`
		Versions []VersionInfo `json:"versions"`
	}
	VersionInfo struct {
		Version         uint64  `json:"version"`
		ParamsID        string  `json:"params_id"`
		LogN            int     `json:"log_n"`
		Slots           int     `json:"slots"`
		LogScale        float64 `json:"log2_scale"`
		Levels          int     `json:"levels"`
		Rotations       []int   `json:"rotations"`
		Relinearization bool    `json:"relinearization"`
	}
	CiphertextOut struct {
		Ciphertext EnvelopeJSON `json:"ciphertext"`
	}
	LinearIn struct {
		Ciphertext EnvelopeJSON `json:"ciphertext" jsonschema:"x: an envelope whose slots in use are the features"`
		Weights    [][]float64  `json:"weights,omitempty" jsonschema:"W: one row per output, one column per feature"`
		Bias       []float64    `json:"bias,omitempty" jsonschema:"b: one value per output"`
		Model      string       `json:"model,omitempty" jsonschema:"a named model the server holds, instead of weights and bias"`
	}
	PolynomialIn struct {
		Ciphertext   EnvelopeJSON `json:"ciphertext"`
		Coefficients []float64    `json:"coefficients" jsonschema:"c0, c1, ..., cd of c0 + c1 x + ... + cd x^d, applied to every slot"`
	}
	AggregateIn struct {
		Ciphertexts []EnvelopeJSON `json:"ciphertexts" jsonschema:"envelopes under the same key version"`
		Op          string         `json:"op" jsonschema:"sum or mean"`
	}
	SimilarityIn struct {
		Ciphertext EnvelopeJSON `json:"ciphertext" jsonschema:"the query embedding"`
		Context    string       `json:"context" jsonschema:"the name of a set of context embeddings the server holds"`
	}
	RekeyIn struct {
		Ciphertext EnvelopeJSON `json:"ciphertext" jsonschema:"an envelope under an earlier version of its key"`
		ToVersion  uint64       `json:"to_version,omitempty" jsonschema:"the later version to re-key into (default: the key's primary version)"`
	}
	SimilarityOut struct {
		Ciphertext EnvelopeJSON `json:"ciphertext" jsonschema:"slot i holds the dot product of the query with context item i"`
		IDs        []string     `json:"ids" jsonschema:"the context items, in slot order"`
	}
)

const toolHelp = `Ciphertexts are envelopes: {"key","version","params_id","level","scale","slots","ciphertext","attestation"}; pass them on unchanged (kmsctl he encrypt, with an encryptor token, makes attested ones; results carry their own attestation; kmsctl he decrypt, with a decryptor token, opens results).`

// safe turns a panic in a tool (a Lattigo corner no check foresaw) into a
// tool error, logged, instead of the end of the server: the MCP SDK does
// not recover handlers' panics.
func safe[In, Out any](s *Server, tool string, h mcp.ToolHandlerFor[In, Out]) mcp.ToolHandlerFor[In, Out] {
	return func(ctx context.Context, req *mcp.CallToolRequest, in In) (res *mcp.CallToolResult, out Out, err error) {
		start := time.Now()
		if tool != "he_describe" && s.calls != nil {
			select {
			case s.calls <- struct{}{}:
				defer func() { <-s.calls }()
			default:
				s.cfg.Metrics.ToolCall(tool, "busy", 0)
				var zero Out
				return nil, zero, fmt.Errorf("busy: %d evaluations are running; retry shortly", cap(s.calls))
			}
		}
		defer func() {
			outcome := "ok"
			if r := recover(); r != nil {
				s.log.Error("tool panicked", "panic", fmt.Sprint(r))
				var zero Out
				res, out, err = nil, zero, errors.New("internal error in the tool: the server logged it")
				outcome = "panic"
			} else if err != nil || res != nil && res.IsError {
				outcome = "tool_error"
			}
			s.logCall(tool, req, outcome, start)
		}()
		return h(ctx, req, in)
	}
}

// logCall counts a tool call in the metrics and logs one line, naming
// the agent's token by id (never the token, never an argument).
func (s *Server) logCall(tool string, req *mcp.CallToolRequest, outcome string, start time.Time) {
	s.cfg.Metrics.ToolCall(tool, outcome, time.Since(start))
	// One line per call, naming the agent's token by id and, for an
	// access token, its client (never the token, never an argument).
	who, client := "stdio", ""
	if req != nil && req.Extra != nil && req.Extra.TokenInfo != nil {
		who, _ = req.Extra.TokenInfo.Extra["token_id"].(string)
		if who == "" {
			who = req.Extra.TokenInfo.UserID
		}
		if u := req.Extra.TokenInfo.UserID; u != who {
			client = u
		}
	}
	attrs := []any{"tool", tool, "token_id", who, "outcome", outcome, "ms", time.Since(start).Milliseconds()}
	if client != "" {
		attrs = append(attrs, "client_id", client)
	}
	s.log.Info("tool call", attrs...)
}

// MCPServer builds the MCP server with the tools and the manifests as
// resources.
func (s *Server) MCPServer() *mcp.Server {
	srv := mcp.NewServer(&mcp.Implementation{Name: "kmsd-mcp", Version: "1.0.0"}, &mcp.ServerOptions{
		Instructions: "Computes on CKKS ciphertexts under keys held in kmsd; never sees a plaintext. " + toolHelp,
		// What kmsd-mcp offers, declared: its tools and resources are
		// fixed at start (no list_changed), it has no prompts (the SDK
		// answers prompts/list anyway: an empty prompts capability says
		// so), and logging, the SDK's default.
		Capabilities: &mcp.ServerCapabilities{Logging: &mcp.LoggingCapabilities{}, Tools: &mcp.ToolCapabilities{}, Resources: &mcp.ResourceCapabilities{}, Prompts: &mcp.PromptCapabilities{}},
	})
	srv.AddReceivingMiddleware(s.checkCost)
	mcp.AddTool(srv, &mcp.Tool{Name: "he_describe", Description: "The keys served: versions, parameter ids, slots, scale, levels, the rotations available, and what each tool needs. Example: {}"}, safe(s, "he_describe", s.describe))
	mcp.AddTool(srv, &mcp.Tool{Name: "he_linear", Description: "y = W·x + b for an encrypted vector x and plaintext W (m rows of n) and b; y is in the first m slots. Needs rotations by powers of two (or the exact ones it names). Example: {\"ciphertext\": ENVELOPE, \"weights\": [[0.5, -1, 2]], \"bias\": [0.1]} or {\"ciphertext\": ENVELOPE, \"model\": \"risk\"}. " + toolHelp}, safe(s, "he_linear", s.linear))
	mcp.AddTool(srv, &mcp.Tool{Name: "he_polynomial", Description: "c0 + c1·x + ... + cd·x^d on every slot (d levels; the relinearization key for d >= 2). Example (degree 2): {\"ciphertext\": ENVELOPE, \"coefficients\": [0.5, 0.197, -0.05]}. " + toolHelp}, safe(s, "he_polynomial", s.polynomial))
	mcp.AddTool(srv, &mcp.Tool{Name: "he_aggregate", Description: "Sum or mean of ciphertexts from several parties under the same key version. Example: {\"ciphertexts\": [ENVELOPE, ENVELOPE], \"op\": \"mean\"}. " + toolHelp}, safe(s, "he_aggregate", s.aggregate))
	mcp.AddTool(srv, &mcp.Tool{Name: "he_similarity", Description: "Dot products of an encrypted query embedding with the plaintext context embeddings the server holds (private retrieval: the server learns nothing of the query); slot i is item i. Example: {\"ciphertext\": ENVELOPE, \"context\": \"docs\"}. " + toolHelp}, safe(s, "he_similarity", s.similarity))
	mcp.AddTool(srv, &mcp.Tool{Name: "he_rekey", Description: "Re-keys a ciphertext of an earlier version of its key into a later one (default: the primary) without decrypting it: one key switch with the switching key an administrator had kmsd issue for the two versions (kmsd refuses versions below min_decryption_version and targets that are not enabled). The result decrypts under the later version. Example: {\"ciphertext\": ENVELOPE, \"to_version\": 3}. " + toolHelp}, safe(s, "he_rekey", s.rekey))
	// A client sees only the manifests of the keys its token may use
	// (he_describe likewise lists only those).
	srv.AddReceivingMiddleware(func(next mcp.MethodHandler) mcp.MethodHandler {
		return func(ctx context.Context, method string, req mcp.Request) (mcp.Result, error) {
			res, err := next(ctx, method, req)
			if lr, ok := res.(*mcp.ListResourcesResult); ok && err == nil && method == "resources/list" {
				kept := lr.Resources[:0:0]
				for _, r := range lr.Resources {
					k := strings.TrimSuffix(strings.TrimPrefix(r.URI, "kmsd://keys/"), "/manifest")
					if allowedExtra(req.GetExtra(), k) == nil {
						kept = append(kept, r)
					}
				}
				lr.Resources = kept
			}
			return res, err
		}
	})
	for _, name := range s.cfg.Keys {
		name := name
		srv.AddResource(&mcp.Resource{URI: "kmsd://keys/" + name + "/manifest", Name: name + " manifest", MIMEType: "application/json",
			Description: "the signed manifest of the primary version of " + name + " (parameters, public and evaluation key blobs)"},
			func(ctx context.Context, req *mcp.ReadResourceRequest) (*mcp.ReadResourceResult, error) {
				if err := allowedExtra(req.Extra, name); err != nil {
					return nil, err
				}
				s.mu.RLock()
				sk := s.served[name]
				l := sk.engines[sk.primary]
				s.mu.RUnlock()
				if l == nil {
					return nil, fmt.Errorf("the primary version of %s is not loaded", name)
				}
				b, err := json.Marshal(l.eng.Keys.Manifest)
				if err != nil {
					return nil, err
				}
				return &mcp.ReadResourceResult{Contents: []*mcp.ResourceContents{{URI: req.Params.URI, MIMEType: "application/json", Text: string(b)}}}, nil
			})
	}
	return srv
}

func (s *Server) describe(ctx context.Context, req *mcp.CallToolRequest, _ DescribeIn) (*mcp.CallToolResult, DescribeOut, error) {
	out := DescribeOut{Tools: map[string]string{
		"he_linear":     "x with n features in its first slots; weights m x n (or a model); rotations by powers of two from 1 up to half the slots (or those it names); 1 level",
		"he_polynomial": "d levels for degree d; the relinearization key for d >= 2",
		"he_aggregate":  "ciphertexts under one key version with the same slots; mean takes 1 level",
		"he_similarity": "a query of the context's dimension; rotations as he_linear; 1 level",
		"he_describe":   "nothing",
		"he_rekey":      "a ciphertext under an enabled version older than the target; one key switch, no level",
	}}
	s.mu.RLock()
	defer s.mu.RUnlock()
	for _, name := range s.cfg.Keys {
		if allowed(req, name) != nil {
			continue
		}
		sk := s.served[name]
		ki := KeyInfo{Name: name, Primary: sk.primary}
		for v, l := range sk.engines {
			e := l.eng
			ki.Versions = append(ki.Versions, VersionInfo{Version: v, ParamsID: e.Keys.Manifest.ParamsID, LogN: e.params.LogN(), Slots: e.Slots(),
				LogScale: float64(e.params.LogDefaultScale()), Levels: e.params.MaxLevel(), Rotations: e.Rotations(), Relinearization: e.Relinearization()})
		}
		sort.Slice(ki.Versions, func(i, j int) bool { return ki.Versions[i].Version > ki.Versions[j].Version })
		out.Keys = append(out.Keys, ki)
	}
	return nil, out, nil
}

func (s *Server) result(ctx context.Context, eng *Engine, ct *rlwe.Ciphertext, slots int, op string, inputs []*client.Envelope, cost Cost) (*mcp.CallToolResult, CiphertextOut, error) {
	env, err := s.attested(ctx, eng, ct, slots, op, inputs, cost)
	if err != nil {
		return nil, CiphertextOut{}, err
	}
	return summary(env), CiphertextOut{Ciphertext: fromEnvelope(env)}, nil
}

// attested seals a result in an envelope and has kmsd attest it as the
// evaluation of op on the inputs, with the server's own evaluator token.
func (s *Server) attested(ctx context.Context, eng *Engine, ct *rlwe.Ciphertext, slots int, op string, inputs []*client.Envelope, cost Cost) (*client.Envelope, error) {
	env, err := eng.Keys.Seal(ct, slots)
	if err != nil {
		return nil, err
	}
	if err := hekeys.AttestEvaluation(ctx, s.cfg.Client, env, op, inputs, cost.Amplification, cost.KeySwitches); err != nil {
		return nil, fmt.Errorf("kmsd did not attest the result: %w", err)
	}
	return env, nil
}

// summary is the text content of a result: a line about the ciphertext in
// the structured content (without it the SDK would repeat the megabytes of
// the structured result as text).
func summary(env *client.Envelope) *mcp.CallToolResult {
	return &mcp.CallToolResult{Content: []mcp.Content{&mcp.TextContent{Text: fmt.Sprintf(
		"result: a ciphertext envelope under %s (in structuredContent.ciphertext); decrypt it with kmsctl he decrypt and a decryptor token", env)}}}
}

func (s *Server) linear(ctx context.Context, req *mcp.CallToolRequest, in LinearIn) (*mcp.CallToolResult, CiphertextOut, error) {
	eng, ct, env, err := s.open(ctx, req, in.Ciphertext)
	if err != nil {
		return nil, CiphertextOut{}, err
	}
	W, b := in.Weights, in.Bias
	if in.Model != "" {
		if W != nil || b != nil {
			return nil, CiphertextOut{}, errors.New("give weights (and bias) or a model, not both")
		}
		m, ok := s.cfg.Models[in.Model]
		if !ok {
			return nil, CiphertextOut{}, fmt.Errorf("no model %q on this server (it has %s)", in.Model, strings.Join(sortedKeys(s.cfg.Models), ", "))
		}
		W, b = m.Weights, m.Bias
	}
	if len(W) == 0 {
		return nil, CiphertextOut{}, errors.New("give weights (one row per output) or a model")
	}
	rows, cols, total := matrixShape(W)
	if err := capsFor(eng.Slots()).check("the weights", rows, cols, total); err != nil {
		return nil, CiphertextOut{}, err
	}
	if len(b) > eng.Slots() {
		return nil, CiphertextOut{}, fmt.Errorf("the bias: %d values; the cap is %d (the slots of the version)", len(b), eng.Slots())
	}
	if len(W[0]) != env.Slots {
		return nil, CiphertextOut{}, fmt.Errorf("the weights have %d columns, the ciphertext holds %d values", len(W[0]), env.Slots)
	}
	y, cost, err := eng.Linear(ctx, ct, W, b)
	if err != nil {
		return nil, CiphertextOut{}, err
	}
	return s.result(ctx, eng, y, len(W), "he_linear", []*client.Envelope{env}, cost)
}

func (s *Server) polynomial(ctx context.Context, req *mcp.CallToolRequest, in PolynomialIn) (*mcp.CallToolResult, CiphertextOut, error) {
	eng, ct, env, err := s.open(ctx, req, in.Ciphertext)
	if err != nil {
		return nil, CiphertextOut{}, err
	}
	if err := polynomialCap(len(in.Coefficients), eng.params.MaxLevel()); err != nil {
		return nil, CiphertextOut{}, err
	}
	y, cost, err := eng.Polynomial(ct, in.Coefficients)
	if err != nil {
		return nil, CiphertextOut{}, err
	}
	return s.result(ctx, eng, y, env.Slots, "he_polynomial", []*client.Envelope{env}, cost)
}

func (s *Server) aggregate(ctx context.Context, req *mcp.CallToolRequest, in AggregateIn) (*mcp.CallToolResult, CiphertextOut, error) {
	if in.Op != "sum" && in.Op != "mean" {
		return nil, CiphertextOut{}, errors.New(`op must be "sum" or "mean"`)
	}
	if len(in.Ciphertexts) == 0 {
		return nil, CiphertextOut{}, errors.New("give at least one ciphertext")
	}
	if err := aggregateCap(len(in.Ciphertexts)); err != nil {
		return nil, CiphertextOut{}, err
	}
	var eng *Engine
	var first *client.Envelope
	var envs []*client.Envelope
	cts := make([]*rlwe.Ciphertext, 0, len(in.Ciphertexts))
	for i, ej := range in.Ciphertexts {
		e, ct, env, err := s.open(ctx, req, ej)
		if err != nil {
			return nil, CiphertextOut{}, fmt.Errorf("ciphertext %d: %w", i, err)
		}
		if first == nil {
			eng, first = e, env
		} else if env.Key != first.Key || env.Version != first.Version || env.Slots != first.Slots {
			return nil, CiphertextOut{}, fmt.Errorf("ciphertext %d is %s; ciphertext 0 is %s: all must be under the same key version with the same slots", i, env, first)
		}
		cts = append(cts, ct)
		envs = append(envs, env)
	}
	y, cost, err := eng.Aggregate(cts, in.Op == "mean")
	if err != nil {
		return nil, CiphertextOut{}, err
	}
	return s.result(ctx, eng, y, first.Slots, "he_aggregate", envs, cost)
}

func (s *Server) similarity(ctx context.Context, req *mcp.CallToolRequest, in SimilarityIn) (*mcp.CallToolResult, SimilarityOut, error) {
	c, ok := s.cfg.Contexts[in.Context]
	if !ok {
		return nil, SimilarityOut{}, fmt.Errorf("no context %q on this server (it has %s)", in.Context, strings.Join(sortedKeys(s.cfg.Contexts), ", "))
	}
	eng, ct, env, err := s.open(ctx, req, in.Ciphertext)
	if err != nil {
		return nil, SimilarityOut{}, err
	}
	if len(c.Embeddings) == 0 || len(c.Embeddings[0]) != env.Slots {
		return nil, SimilarityOut{}, fmt.Errorf("context %q has embeddings of %d dimensions, the query %d", in.Context, dim(c.Embeddings), env.Slots)
	}
	rows, cols, total := matrixShape(c.Embeddings)
	if err := capsFor(eng.Slots()).check(fmt.Sprintf("context %q", in.Context), rows, cols, total); err != nil {
		return nil, SimilarityOut{}, err
	}
	y, cost, err := eng.MatVec(ctx, ct, c.Embeddings)
	if err != nil {
		return nil, SimilarityOut{}, err
	}
	sealed, err := s.attested(ctx, eng, y, len(c.Embeddings), "he_similarity", []*client.Envelope{env}, cost)
	if err != nil {
		return nil, SimilarityOut{}, err
	}
	return summary(sealed), SimilarityOut{Ciphertext: fromEnvelope(sealed), IDs: c.IDs}, nil
}

func (s *Server) rekey(ctx context.Context, req *mcp.CallToolRequest, in RekeyIn) (*mcp.CallToolResult, CiphertextOut, error) {
	eng, _, env, err := s.open(ctx, req, in.Ciphertext)
	if err != nil {
		return nil, CiphertextOut{}, err
	}
	to := in.ToVersion
	s.mu.RLock()
	sk := s.served[env.Key]
	if to == 0 {
		to = sk.primary
	}
	enabled := sk.enabled[to]
	s.mu.RUnlock()
	switch {
	case to <= env.Version:
		return nil, CiphertextOut{}, fmt.Errorf("the ciphertext is under version %d; re-keying goes to a later version (to_version %d)", env.Version, to)
	case !enabled:
		return nil, CiphertextOut{}, fmt.Errorf("version %d of key %q is not enabled in kmsd: ciphertexts are re-keyed only into an enabled version", to, env.Key)
	}
	m, err := s.cfg.Fetcher.Manifest(ctx, env.Key, to)
	if err != nil {
		return nil, CiphertextOut{}, err
	}
	swk, err := s.cfg.Fetcher.SwitchingKey(ctx, eng.Keys, to, false)
	if err != nil {
		return nil, CiphertextOut{}, err
	}
	out, err := hekeys.Rekey(eng.Keys, m, swk, env)
	if err != nil {
		return nil, CiphertextOut{}, err
	}
	if err := hekeys.AttestEvaluation(ctx, s.cfg.Client, out, kmsRekeyOp, []*client.Envelope{env}, 1, 1); err != nil {
		return nil, CiphertextOut{}, fmt.Errorf("kmsd did not attest the result: %w", err)
	}
	return summary(out), CiphertextOut{Ciphertext: fromEnvelope(out)}, nil
}

// kmsRekeyOp is the attestation op of a re-keying (kms.OpRekey).
const kmsRekeyOp = "rekey"

func dim(e [][]float64) int {
	if len(e) == 0 {
		return 0
	}
	return len(e[0])
}

func sortedKeys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	if len(out) == 0 {
		return []string{"none"}
	}
	return out
}

// HTTPHandler serves MCP over streamable HTTP at /mcp. Every request needs
// a bearer token that kmsd's introspection says is active; its key
// patterns limit the keys a call may use. A refusal is 401 with
// WWW-Authenticate: Bearer. The client's token goes to kmsd only to be
// introspected; everything else uses the server's own evaluator token.
func (s *Server) HTTPHandler() http.Handler {
	srv := s.MCPServer()
	opts := &mcp.StreamableHTTPOptions{MaxRequestBodyBytes: s.cfg.MaxRequestBytes, SessionTimeout: s.cfg.SessionTimeout, Stateless: s.cfg.Stateless}
	if !s.cfg.Stateless {
		// Resumable streams: each SSE stream starts with a priming event
		// (its id, for Last-Event-ID) and the events are kept, at most
		// eventStoreBytes for all sessions, the oldest dropped first.
		es := mcp.NewMemoryEventStore(nil)
		es.SetMaxBytes(eventStoreBytes)
		opts.EventStore = es
	}
	h := mcp.NewStreamableHTTPHandler(func(*http.Request) *mcp.Server { return srv }, opts)
	// The SDK's bearer check gets what this handler's verify found (one
	// introspection, counted once, per request).
	verified := func(ctx context.Context, token string, r *http.Request) (*auth.TokenInfo, error) {
		if ti, ok := ctx.Value(verifiedKey{}).(*auth.TokenInfo); ok {
			return ti, nil
		}
		return s.verify(ctx, token, r)
	}
	withInfo := auth.RequireBearerToken(verified, &auth.RequireBearerTokenOptions{AllowMissingExpiration: true})(h)
	mux := http.NewServeMux()
	if s.resource != "" {
		meta := s.metadata()
		for _, p := range s.metadataPaths() {
			mux.HandleFunc("GET "+p, func(w http.ResponseWriter, r *http.Request) {
				w.Header().Set("Content-Type", "application/json")
				w.Header().Set("Cache-Control", "max-age=300")
				w.Write(meta)
			})
		}
	}
	mux.Handle("/mcp", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// Where the request says it goes, and for a browser where it
		// comes from, before the token is looked at (DNS rebinding, a
		// page of another site).
		if s.hosts != nil && !s.hosts[strings.ToLower(r.Host)] {
			http.Error(w, "this server does not answer for that Host", http.StatusMisdirectedRequest)
			return
		}
		if o := r.Header.Get("Origin"); o != "" && !s.originAllowed(o) {
			http.Error(w, "requests from this Origin are not served (kmsd-mcp --allowed-origin)", http.StatusForbidden)
			return
		}
		scheme, tok, ok := strings.Cut(r.Header.Get("Authorization"), " ")
		if !ok || !strings.EqualFold(scheme, "Bearer") || tok == "" {
			s.unauthorized(w, "", "a bearer token is required")
			return
		}
		if !wire.WellFormedToken(tok) {
			s.unauthorized(w, "invalid_token", "the token is not active in kmsd")
			return
		}
		if !s.knownToken(tok) && !s.allowSource(r.RemoteAddr) {
			w.Header().Set("Retry-After", "1")
			http.Error(w, "too many new tokens from this address; retry later", http.StatusTooManyRequests)
			return
		}
		ti, err := s.verify(r.Context(), tok, r)
		if err != nil {
			if errors.Is(err, auth.ErrInvalidToken) {
				s.unauthorized(w, "invalid_token", "the token is not active in kmsd")
			} else {
				http.Error(w, "kmsd could not be asked about the token", http.StatusServiceUnavailable)
			}
			return
		}
		if r.Method == http.MethodPost {
			var ok bool
			if r, ok = s.checkScope(w, r, ti); !ok {
				return
			}
		}
		withInfo.ServeHTTP(&sseRetry{ResponseWriter: w}, r.WithContext(context.WithValue(r.Context(), verifiedKey{}, ti)))
	}))
	return mux
}

// eventStoreBytes bounds the events kept for resumption, all sessions
// together.
const eventStoreBytes = 32 << 20

// sseRetryMillis is the reconnection delay a stream's priming event asks
// of the client (the SSE retry field).
const sseRetryMillis = "2000"

// sseRetry adds the SSE retry field to a stream's priming event (the SDK
// writes the event's name and id, not the retry field the MCP transport
// spec says a server should send with it): the first write of an event
// stream that is a priming event gets "retry: <ms>" before its data.
type sseRetry struct {
	http.ResponseWriter
	done bool
}

func (w *sseRetry) Write(b []byte) (int, error) {
	if w.done {
		return w.ResponseWriter.Write(b)
	}
	w.done = true
	if !strings.HasPrefix(w.Header().Get("Content-Type"), "text/event-stream") || !bytes.HasPrefix(b, []byte("event: prime\n")) || bytes.Contains(b, []byte("\nretry:")) {
		return w.ResponseWriter.Write(b)
	}
	i := bytes.Index(b, []byte("data: "))
	if i < 0 {
		return w.ResponseWriter.Write(b)
	}
	out := make([]byte, 0, len(b)+32)
	out = append(append(append(out, b[:i]...), "retry: "+sseRetryMillis+"\n"...), b[i:]...)
	if _, err := w.ResponseWriter.Write(out); err != nil {
		return 0, err
	}
	return len(b), nil
}

// Unwrap lets http.ResponseController reach the connection (flushes).
func (w *sseRetry) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// originAllowed reports whether a browser's Origin may call: this
// server's own origin, or one of Config.AllowedOrigins.
func (s *Server) originAllowed(origin string) bool {
	if slices.Contains(s.cfg.AllowedOrigins, origin) {
		return true
	}
	u, err := url.Parse(s.resource)
	return err == nil && s.resource != "" && origin == u.Scheme+"://"+u.Host
}

// SetHosts sets the Host headers the server answers (host:port, as
// clients send it); a request for another is refused (421) before its
// token is looked at. Call it before HTTPHandler.
func (s *Server) SetHosts(hosts []string) {
	s.hosts = map[string]bool{}
	for _, h := range hosts {
		s.hosts[strings.ToLower(h)] = true
	}
}

// checkScope refuses, with 403 and an insufficient_scope challenge (RFC
// 6750 3.1, the MCP authorization spec's step-up), a request that names a
// key the token may not use: a tools/call whose ciphertexts are under it,
// or a resources/read of its manifest. Tokens that may use every served
// key skip it (no second reading of the body). The body is read (within
// Config.MaxRequestBytes) and handed on.
func (s *Server) checkScope(w http.ResponseWriter, r *http.Request, ti *auth.TokenInfo) (*http.Request, bool) {
	patterns, _ := ti.Extra["keys"].([]string)
	all := true
	for _, k := range s.cfg.Keys {
		all = all && wire.MayUse(patterns, k)
	}
	if all {
		return r, true
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, s.cfg.MaxRequestBytes))
	if err != nil {
		http.Error(w, "the request body is too large or could not be read", http.StatusRequestEntityTooLarge)
		return r, false
	}
	r.Body = io.NopCloser(bytes.NewReader(body))
	names, ok := keysNamed(body)
	if !ok {
		http.Error(w, "the message has a member named twice: refused (its reading would depend on the reader)", http.StatusBadRequest)
		return r, false
	}
	for _, k := range names {
		if wire.ValidateName(k) == nil && slices.Contains(s.cfg.Keys, k) && !wire.MayUse(patterns, k) {
			role, _ := ti.Extra["role"].(string)
			ch := `Bearer realm="kmsd-mcp", error="insufficient_scope", scope="` + role + ` key:` + k + `"`
			if s.resource != "" {
				ch += `, resource_metadata="` + s.metadataURL() + `"`
			}
			w.Header().Set("WWW-Authenticate", ch)
			http.Error(w, fmt.Sprintf("your token may not use key %q: it needs the scope key:%s", k, k), http.StatusForbidden)
			return r, false
		}
	}
	return r, true
}

// keysNamed lists the keys a JSON-RPC message (or batch) names: the
// envelopes' keys of a tools/call, the key of a resources/read. Member
// names match exactly, as the SDK's decoder matches them (encoding/json's
// structs would also take "Method" or a Kelvin sign for k, and read
// something else than the SDK does); a member named twice anywhere on the
// way is not ok. Anything else it cannot read names none (the SDK
// answers it).
func keysNamed(body []byte) ([]string, bool) {
	b := bytes.TrimSpace(body)
	var msgs []json.RawMessage
	if len(b) > 0 && b[0] == '[' {
		if json.Unmarshal(b, &msgs) != nil {
			return nil, true
		}
	} else {
		msgs = []json.RawMessage{b}
	}
	var out []string
	for _, raw := range msgs {
		m, ok := members(raw)
		if !ok {
			return nil, false
		}
		var method string
		_ = json.Unmarshal(m["method"], &method)
		params, ok := members(m["params"])
		if !ok {
			return nil, false
		}
		switch method {
		case "tools/call":
			args, ok := members(params["arguments"])
			if !ok {
				return nil, false
			}
			envs := []json.RawMessage{args["ciphertext"]}
			var list []json.RawMessage
			_ = json.Unmarshal(args["ciphertexts"], &list)
			for _, env := range append(envs, list...) {
				em, ok := members(env)
				if !ok {
					return nil, false
				}
				var k string
				if json.Unmarshal(em["key"], &k) == nil && k != "" {
					out = append(out, k)
				}
			}
		case "resources/read":
			var uri string
			_ = json.Unmarshal(params["uri"], &uri)
			if k, ok := strings.CutPrefix(uri, "kmsd://keys/"); ok {
				out = append(out, strings.TrimSuffix(k, "/manifest"))
			}
		}
	}
	return out, true
}

// members reads a JSON object's members by their exact names; not ok if a
// name comes twice. Anything but an object has none.
func members(raw json.RawMessage) (map[string]json.RawMessage, bool) {
	out := map[string]json.RawMessage{}
	dec := json.NewDecoder(bytes.NewReader(raw))
	if t, err := dec.Token(); err != nil || t != json.Delim('{') {
		return out, true
	}
	for dec.More() {
		t, err := dec.Token()
		if err != nil {
			return out, true
		}
		name, _ := t.(string)
		var v json.RawMessage
		if err := dec.Decode(&v); err != nil {
			return out, true
		}
		if _, dup := out[name]; dup {
			return nil, false
		}
		out[name] = v
	}
	return out, true
}

// knownToken reports whether tok is not new: kmsd's answer about it is in
// the cache, or was and said it is active (a client whose answer aged
// out is asked about again without counting against its address: the
// limit is for tokens nobody vouched for).
func (s *Server) knownToken(tok string) bool {
	h := sha256.Sum256([]byte(tok))
	s.introMu.Lock()
	defer s.introMu.Unlock()
	e, ok := s.intro[h]
	return ok && (time.Since(e.at) < s.cfg.IntrospectTTL || e.info.Active)
}

// allowSource takes one of the client address's introspections; at most
// maxIntro addresses are tracked (when full, the idle ones are dropped,
// and if none is, all: a flood from many addresses resets the limits
// rather than growing memory).
func (s *Server) allowSource(remote string) bool {
	src := sourceKey(remote)
	s.srcMu.Lock()
	defer s.srcMu.Unlock()
	if s.sources == nil {
		s.sources = map[string]*rate.Limiter{}
	}
	r, b := s.cfg.IntrospectRate, s.cfg.IntrospectBurst
	if r <= 0 || b <= 0 {
		r, b = 5, 20 // New's defaults
	}
	l, ok := s.sources[src]
	if !ok {
		if len(s.sources) >= maxIntro {
			for k, v := range s.sources {
				if k != overflowSource && v.Tokens() >= float64(v.Burst()) {
					delete(s.sources, k)
				}
			}
		}
		if len(s.sources) >= maxIntro {
			// Full of busy addresses: newcomers share one bucket (never
			// a reset of everyone's: that would let a flood from many
			// addresses free the limited ones).
			src = overflowSource
			if l = s.sources[src]; l == nil {
				l = rate.NewLimiter(rate.Limit(r), b)
				s.sources[src] = l
			}
		} else {
			l = rate.NewLimiter(rate.Limit(r), b)
			s.sources[src] = l
		}
	}
	return l.Allow()
}

// overflowSource is the bucket shared by new addresses while the table is
// full.
const overflowSource = "overflow"

// sourceKey is the limit's key for a client address: the IPv4 address,
// or the IPv6 /64 (one host holds a whole /64).
func sourceKey(remote string) string {
	host, _, err := net.SplitHostPort(remote)
	if err != nil {
		host = remote
	}
	ip := net.ParseIP(host)
	if ip == nil || ip.To4() != nil {
		return host
	}
	return ip.Mask(net.CIDRMask(64, 128)).String() + "/64"
}

// verifiedKey carries the TokenInfo HTTPHandler's verify made.
type verifiedKey struct{}

// SetResource sets this server's canonical URL (https://host[:port]/mcp:
// the resource its clients' tokens are bound to, which the
// protected-resource metadata, RFC 9728, names). Call it before
// HTTPHandler.
func (s *Server) SetResource(resource string) {
	s.resource = resource
}

// metadataPaths are where the protected-resource metadata is served: the
// well-known path inserted before the resource's path (RFC 9728 3.1), and
// at the root for clients that look there.
func (s *Server) metadataPaths() []string {
	u, err := url.Parse(s.resource)
	if err != nil {
		return nil
	}
	out := []string{"/.well-known/oauth-protected-resource"}
	if p := strings.TrimSuffix(u.Path, "/"); p != "" {
		out = append(out, "/.well-known/oauth-protected-resource"+p)
	}
	return out
}

// metadataURL is the metadata's URL, for WWW-Authenticate.
func (s *Server) metadataURL() string {
	u, err := url.Parse(s.resource)
	if err != nil {
		return ""
	}
	paths := s.metadataPaths()
	u.Path, u.RawPath = paths[len(paths)-1], ""
	return u.String()
}

// metadata is the protected-resource metadata document (RFC 9728 2).
func (s *Server) metadata() []byte {
	m := map[string]any{
		"resource":                 s.resource,
		"scopes_supported":         []string{"worker", "encryptor"},
		"bearer_methods_supported": []string{"header"},
		"resource_name":            "kmsd-mcp",
	}
	if s.cfg.AuthorizationServer != "" {
		// kmsd: clients get tokens for this server at its token endpoint
		// (client credentials, with this server's URL as the resource).
		m["authorization_servers"] = []string{s.cfg.AuthorizationServer}
	}
	b, _ := json.Marshal(m)
	return b
}

// unauthorized answers 401 with a Bearer challenge (RFC 6750) naming the
// protected-resource metadata (RFC 9728 5.1); errCode "" when no token
// was presented.
func (s *Server) unauthorized(w http.ResponseWriter, errCode, msg string) {
	ch := `Bearer realm="kmsd-mcp"`
	if errCode != "" {
		ch += `, error="` + errCode + `"`
	}
	if s.resource != "" {
		ch += `, resource_metadata="` + s.metadataURL() + `"`
	}
	w.Header().Set("WWW-Authenticate", ch)
	http.Error(w, msg, http.StatusUnauthorized)
}

// maxIntro bounds the introspection cache: clients presenting ever new
// (made-up) tokens cannot grow it without limit.
const maxIntro = 4096

// remember caches an introspection answer; when the cache is full it drops
// the expired answers, and if none has expired the oldest one (never the
// whole cache: clients presenting ever new tokens must not flush the
// answers about the others).
func (s *Server) remember(h [32]byte, info *client.Introspection, at time.Time) {
	s.introMu.Lock()
	defer s.introMu.Unlock()
	if len(s.intro) >= maxIntro {
		var oldest [32]byte
		var oldestAt time.Time
		for k, e := range s.intro {
			if time.Since(e.at) >= s.cfg.IntrospectTTL {
				delete(s.intro, k)
			} else if oldestAt.IsZero() || e.at.Before(oldestAt) {
				oldest, oldestAt = k, e.at
			}
		}
		if len(s.intro) >= maxIntro {
			delete(s.intro, oldest)
		}
	}
	s.intro[h] = introEntry{info: info, at: at}
}

// errSlowIntrospection: kmsd's answer about a token came later than the
// introspection TTL after it was asked (a 503: the client retries).
var errSlowIntrospection = errors.New("kmsd answered too slowly about the token")

// verify introspects a client's token with kmsd (answers kept
// IntrospectTTL, keyed by the token's hash) and makes the SDK's TokenInfo.
func (s *Server) verify(ctx context.Context, token string, _ *http.Request) (*auth.TokenInfo, error) {
	// Not the shape of a kmsd token: refused here, kmsd is not asked.
	if !wire.WellFormedToken(token) {
		return nil, auth.ErrInvalidToken
	}
	h := sha256.Sum256([]byte(token))
	s.introMu.Lock()
	e, ok := s.intro[h]
	s.introMu.Unlock()
	info := e.info
	cached := ok && time.Since(e.at) < s.cfg.IntrospectTTL
	s.cfg.Metrics.Introspection(cached)
	if !cached {
		// One question to kmsd for the requests presenting one token at
		// once; its answer (inactive ones too) is kept IntrospectTTL from
		// when it was asked, not from when it came: an answer that took
		// longer than that is used by nobody (a slow answer must not
		// stretch the revocation bound).
		v, err, _ := s.introFlight.Do(string(h[:]), func() (any, error) {
			asked := time.Now()
			i, err := s.cfg.Client.IntrospectToken(context.WithoutCancel(ctx), token)
			if err != nil {
				return nil, err
			}
			e := introEntry{info: i, at: asked}
			if time.Since(asked) < s.cfg.IntrospectTTL {
				s.remember(h, i, asked)
			}
			return e, nil
		})
		if err != nil {
			return nil, err
		}
		e := v.(introEntry)
		if time.Since(e.at) >= s.cfg.IntrospectTTL {
			return nil, errSlowIntrospection
		}
		info = e.info
	}
	if !info.Active || (info.Exp != 0 && time.Unix(info.Exp, 0).Before(time.Now())) {
		return nil, auth.ErrInvalidToken
	}
	// The tools are for the parties that compute and bring data: worker
	// and encryptor tokens. An admin, auditor or decryptor token is
	// refused (a decryptor that could have its own ciphertexts evaluated
	// and attested would hold both ends of the chain).
	if info.Role != string(wire.RoleWorker) && info.Role != string(wire.RoleEncryptor) {
		return nil, auth.ErrInvalidToken
	}
	// Over HTTP the token must be for this server: its audience holds the
	// canonical URL (a token for another service, which that service
	// could present here, is refused: the confused deputy).
	if s.resource != "" {
		if len(info.Aud) == 0 && !s.cfg.AllowUnbound || len(info.Aud) > 0 && !slices.Contains(info.Aud, s.resource) {
			return nil, auth.ErrInvalidToken
		}
	}
	// The user a session is bound to is the OAuth client for an access
	// token (its next access token continues the session; another
	// client's cannot), the token itself otherwise.
	user := info.TokenID
	if info.ClientID != "" {
		user = info.ClientID
	}
	ti := &auth.TokenInfo{UserID: user, Extra: map[string]any{"keys": info.Keys, "role": info.Role, "token_id": info.TokenID}}
	if info.Exp != 0 {
		ti.Expiration = time.Unix(info.Exp, 0)
	}
	return ti, nil
}
