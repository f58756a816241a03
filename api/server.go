// Package api is kmsd's REST API: a chi router, bearer-token auth, strict
// JSON decoding and RFC 9457 problem responses. Handlers are thin: decode,
// validate, one call into kms.Service, render.
package api

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"log/slog"
	"math"
	"net/http"
	"runtime/debug"
	"strconv"
	"strings"
	"time"

	"github.com/go-chi/chi/v5"

	"github.com/kmsd-project/kmsd/api/client"
	"github.com/kmsd-project/kmsd/kms"
)

// Server serves the API over a kms.Service.
type Server struct {
	svc  *kms.Service
	log  *slog.Logger
	opts Options

	blobs   blobChecks   // stored blobs checked against their digests
	unauth  *rateLimiter // per source, for anonymous and failed-auth requests; nil: off
	perTok  *rateLimiter // per token; nil: off
	issue   *rateLimiter // access tokens per OAuth client
	refused refusals
}

// Options are the optional parts of the API.
type Options struct {
	// Audit, if set, records every request: the response waits until its
	// record is durable (fail-closed). kmsd always sets it; only the
	// benchmark runs without.
	Audit kms.AuditStore
	// Prover serves checkpoints and proofs (needs Audit).
	Prover kms.AuditProver
	// Stream, if set, gets a copy of every committed record.
	Stream RecordSink
	// Blobs serves the HE kinds' public and evaluation keys.
	Blobs BlobSource
	// Tiles serves the audit archive (a tlog-tiles log) read-only under
	// /v1/audit/tiles/; nil: no archive (404).
	Tiles TileSource
	// Backup, if set, serves GET /v1/backup.
	Backup BackupFunc
	// KEK, if set, serves /v1/kek (KEK rotation).
	KEK KEKAdmin
	// ArchiveStatus, if set, says in /readyz where the archive stands.
	ArchiveStatus func(ctx context.Context) *client.ArchiveStatus
	// Peers, if set, are the kmsd nodes this one shares threshold keys
	// with: POST /v1/peer/{op} answers them.
	Peers *Peers
	// Background is the context of long operations (HE generations that
	// answer 202); cancel it at shutdown. Default: context.Background().
	Background context.Context
	// UnauthRate limits, per client address, the requests that carry no
	// valid token (anonymous or failed authentication), in requests per
	// second with bursts of UnauthBurst; past it they get 429 and are
	// summarized in one audit record per address and RefusalWindow. Zero:
	// no limit.
	UnauthRate    float64
	UnauthBurst   int
	RefusalWindow time.Duration // default 1 minute
	// TokenRate limits each token's requests per second (bursts of twice
	// that); past it, 429. Zero: no limit.
	TokenRate float64
	// Metrics, if set, is told of every request and refusal.
	Metrics Metrics
	// OAuth configures the token endpoint and its metadata.
	OAuth OAuthOptions
}

// Metrics is told of what the API does (kmsd's Prometheus metrics). Its
// labels are bounded: route is the route's pattern ("unmatched" for none,
// "rate_limited" for a 429 before routing; never a path, so never a key
// name or a token), method one of the standard methods or "OTHER".
type Metrics interface {
	// Request is one answered request.
	Request(route, method string, code int, d time.Duration)
	// RateLimited is one request refused with 429: scope "address" (no
	// valid token) or "token".
	RateLimited(scope string)
	// Audited is one request's audit record made durable (err nil) or
	// not (err: the request was answered 503).
	Audited(err error)
}

// metricMethod bounds the method label: a client chooses the method.
func metricMethod(m string) string {
	switch m {
	case http.MethodGet, http.MethodHead, http.MethodPost, http.MethodPut, http.MethodPatch, http.MethodDelete, http.MethodOptions:
		return m
	}
	return "OTHER"
}

// New builds a Server. log receives one event per request.
func New(svc *kms.Service, log *slog.Logger, opts Options) *Server {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if opts.Background == nil {
		opts.Background = context.Background()
	}
	if opts.RefusalWindow <= 0 {
		opts.RefusalWindow = time.Minute
	}
	s := &Server{svc: svc, log: log, opts: opts}
	s.unauth = newRateLimiter(opts.UnauthRate, opts.UnauthBurst, time.Now)
	s.perTok = newRateLimiter(opts.TokenRate, int(math.Ceil(2*opts.TokenRate)), time.Now)
	s.issue = newRateLimiter(float64(time.Second)/float64(issueEvery), issueBurst, time.Now)
	s.refused.window = opts.RefusalWindow
	return s
}

// event is the one log record of a request; handlers add to it.
type event struct {
	id        string
	tokenID   string
	problem   string
	err       error
	bytesIn   int
	key       string
	version   uint64
	principal *kms.Principal
	authErr   error            // why the presented token was refused; nil if none was presented
	rec       *kms.AuditRecord // pending audit record, nil when auditing is off
	// outcomeUnknown: the store did not say whether the request's change
	// (and its record) committed; no second record is written.
	outcomeUnknown bool
}

type ctxKey struct{}

func eventFrom(r *http.Request) *event {
	ev, _ := r.Context().Value(ctxKey{}).(*event)
	return ev
}

// statusWriter records the status and size of a response.
type statusWriter struct {
	http.ResponseWriter
	status int
	bytes  int
}

func (w *statusWriter) WriteHeader(code int) {
	if w.status == 0 {
		w.status = code
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusWriter) Write(b []byte) (int, error) {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	n, err := w.ResponseWriter.Write(b)
	w.bytes += n
	return n, err
}

func newRequestID() string {
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// observe wraps every request: request id, panic recovery, no-store caching
// and the request's one log event.
func (s *Server) observe(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		ev := &event{id: newRequestID()}
		r = r.WithContext(context.WithValue(r.Context(), ctxKey{}, ev))
		sw := &statusWriter{ResponseWriter: w}
		sw.Header().Set("X-Request-Id", ev.id)
		sw.Header().Set("Cache-Control", "no-store")
		defer func() {
			if p := recover(); p != nil {
				if p == http.ErrAbortHandler {
					panic(p)
				}
				s.log.Error("panic", "request_id", ev.id, "panic", p, "stack", string(debug.Stack()))
				if sw.status == 0 {
					writeProblem(sw, r, http.StatusInternalServerError, ProbInternal, "")
				}
			}
			route := ""
			if rc := chi.RouteContext(r.Context()); rc != nil {
				route = rc.RoutePattern()
			}
			if s.opts.Metrics != nil {
				mroute := route
				switch {
				case mroute == "" && ev.problem == ProbRateLimited:
					mroute = "rate_limited" // refused before routing
				case mroute == "":
					mroute = "unmatched"
				}
				s.opts.Metrics.Request(mroute, metricMethod(r.Method), sw.status, time.Since(start))
			}
			attrs := []slog.Attr{
				slog.String("request_id", ev.id),
				slog.String("method", r.Method),
				slog.String("route", route),
				slog.Int("status", sw.status),
				slog.Float64("duration_ms", float64(time.Since(start).Microseconds())/1000),
				slog.Int("bytes_in", ev.bytesIn),
				slog.Int("bytes_out", sw.bytes),
				slog.String("remote", r.RemoteAddr),
			}
			if ev.tokenID != "" {
				attrs = append(attrs, slog.String("token_id", ev.tokenID))
			}
			if ev.key != "" {
				attrs = append(attrs, slog.String("key", ev.key))
			}
			if ev.problem != "" {
				attrs = append(attrs, slog.String("problem", ev.problem))
			}
			level := slog.LevelInfo
			if ev.problem == ProbRateLimited {
				level = slog.LevelDebug // one audit summary per source and window instead
			}
			if ev.err != nil {
				attrs = append(attrs, slog.String("error", ev.err.Error()))
				level = slog.LevelError
			}
			s.log.LogAttrs(r.Context(), level, "request", attrs...)
		}()
		next.ServeHTTP(sw, r)
	})
}

// identify resolves the bearer token, if one is presented, before the
// request is audited or limited: a valid one sets the principal, anything
// else the reason it is refused (which authenticate answers on the routes
// that need a token).
func (s *Server) identify(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ev := eventFrom(r)
		if h := r.Header.Get("Authorization"); h != "" {
			scheme, tok, ok := strings.Cut(h, " ")
			if !ok || !strings.EqualFold(scheme, "Bearer") || tok == "" {
				ev.authErr = kms.Errorf(kms.KindUnauthenticated, "the Authorization header must be \"Bearer <token>\"")
			} else if p, err := s.svc.Authenticate(r.Context(), tok); err != nil {
				ev.authErr = err
			} else {
				ev.tokenID, ev.principal = p.TokenID, p
			}
		}
		next.ServeHTTP(w, r)
	})
}

// limit applies the per-address limit to requests without a valid token:
// refusals past it are counted into one audit record per address and
// window, not one each. (The per-token limit is limitToken, inside the
// audit.)
func (s *Server) limit(next http.Handler) http.Handler {
	if s.unauth == nil && s.perTok == nil {
		return next
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ev := eventFrom(r)
		if ev.principal == nil && s.unauth != nil {
			src := sourceOf(r.RemoteAddr)
			if ok, wait := s.unauth.allow(src); !ok {
				s.refused.note(src, time.Now())
				if s.opts.Metrics != nil {
					s.opts.Metrics.RateLimited("address")
				}
				w.Header().Set("Retry-After", strconv.Itoa(int(math.Ceil(wait.Seconds()))))
				writeProblem(w, r, http.StatusTooManyRequests, ProbRateLimited, "too many requests without a valid token from this address; retry later")
				return
			}
		}
		next.ServeHTTP(w, r)
	})
}

// limitToken is the per-token limit; it runs inside the audit, so a
// refusal of an authenticated request has its record.
func (s *Server) limitToken(next http.Handler) http.Handler {
	if s.perTok == nil {
		return next
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if p := eventFrom(r).principal; p != nil {
			if ok, wait := s.perTok.allow(p.TokenID); !ok {
				if s.opts.Metrics != nil {
					s.opts.Metrics.RateLimited("token")
				}
				w.Header().Set("Retry-After", strconv.Itoa(int(math.Ceil(wait.Seconds()))))
				writeProblem(w, r, http.StatusTooManyRequests, ProbRateLimited, "this token is over its request rate limit; retry later")
				return
			}
		}
		next.ServeHTTP(w, r)
	})
}

// authenticate stops requests without a valid bearer token with 401.
func (s *Server) authenticate(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ev := eventFrom(r)
		switch {
		case ev.principal != nil:
			next.ServeHTTP(w, r)
		case ev.authErr != nil:
			writeError(w, r, ev.authErr)
		default:
			writeProblem(w, r, http.StatusUnauthorized, ProbUnauthenticated, "a bearer token is required (Authorization: Bearer <token>)")
		}
	})
}

// allow wraps a handler with an authorization check for perm on the key
// named in the route (if any).
func allow(perm kms.Permission, h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		ev := eventFrom(r)
		name := chi.URLParam(r, "name")
		ev.key = recordedName(name)
		if err := ev.principal.Authorize(perm, name); err != nil {
			writeError(w, r, err)
			return
		}
		h(w, r)
	}
}

// allowedMethods lists the methods the router serves on path, for the
// Allow header of a 405.
func allowedMethods(routes chi.Routes, path string) []string {
	var out []string
	for _, m := range []string{http.MethodGet, http.MethodHead, http.MethodPost, http.MethodPut, http.MethodPatch, http.MethodDelete} {
		if routes.Match(chi.NewRouteContext(), m, path) {
			out = append(out, m)
		}
	}
	return out
}

// SetIssuer sets the OAuth issuer (kmsd's URL) when it is known only once
// the listener is (Options.OAuth.Issuer "" and a port chosen by the
// system). Call it before Handler.
func (s *Server) SetIssuer(issuer string) { s.opts.OAuth.Issuer = issuer }

// Handler returns the API's router.
func (s *Server) Handler() http.Handler {
	r := chi.NewRouter()
	r.Use(s.observe, s.identify, s.limit, s.audited, s.limitToken)
	r.NotFound(func(w http.ResponseWriter, r *http.Request) {
		writeProblem(w, r, http.StatusNotFound, ProbNotFound, "no such endpoint")
	})
	r.MethodNotAllowed(func(w http.ResponseWriter, req *http.Request) {
		allowed := allowedMethods(r, req.URL.Path)
		w.Header().Set("Allow", strings.Join(allowed, ", "))
		writeProblem(w, req, http.StatusMethodNotAllowed, ProbMethod, "method not allowed on this endpoint; it allows "+strings.Join(allowed, ", "))
	})
	r.Get("/healthz", s.healthz)
	r.Get("/readyz", s.readyz)
	r.Get("/v1/identity", s.identity)
	r.Get("/.well-known/oauth-authorization-server", s.oauthMetadata)
	// The client authenticates inside (HTTP Basic): the per-address limit
	// of requests without a valid bearer token bounds guessing.
	r.Post(TokenEndpoint, s.oauthToken)
	r.Get(AuthorizeEndpoint, s.oauthAuthorize)
	// Other kmsd nodes: authenticated inside, by their identity keys.
	r.Post("/v1/peer/{op}", s.peerRequest)
	r.Group(func(r chi.Router) {
		r.Use(s.authenticate)
		r.Post("/v1/keys", allow(kms.PermManageKey, s.createKey))
		r.Get("/v1/keys", allow(kms.PermReadKey, s.listKeys))
		r.Get("/v1/keys/{name}", allow(kms.PermReadKey, s.getKey))
		r.Get("/v1/keys/{name}/versions", allow(kms.PermReadKey, s.listVersions))
		r.Patch("/v1/keys/{name}", allow(kms.PermManageKey, s.updateKey))
		r.Post("/v1/keys/{name}/rotate", allow(kms.PermManageKey, s.rotate))
		r.Get("/v1/keys/{name}/versions/{version}/public-key", allow(kms.PermReadKey, s.publicKey))
		r.Head("/v1/keys/{name}/versions/{version}/public-key", allow(kms.PermReadKey, s.publicKey))
		r.Post("/v1/keys/{name}/versions/{version}/disable", allow(kms.PermManageKey, s.versionAction(kms.ActDisable)))
		r.Post("/v1/keys/{name}/versions/{version}/enable", allow(kms.PermManageKey, s.versionAction(kms.ActEnable)))
		r.Post("/v1/keys/{name}/versions/{version}/schedule-destroy", allow(kms.PermManageKey, s.versionAction(kms.ActScheduleDestroy)))
		r.Post("/v1/keys/{name}/versions/{version}/cancel-destroy", allow(kms.PermManageKey, s.versionAction(kms.ActCancelDestroy)))
		r.Post("/v1/keys/{name}/sign", allow(kms.PermUseKey, s.sign))
		r.Post("/v1/keys/{name}/verify", allow(kms.PermUseKey, s.verify))
		r.Post("/v1/keys/{name}/decapsulate", allow(kms.PermUseKey, s.decapsulate))
		r.Post("/v1/tokens", allow(kms.PermManageTokens, s.createToken))
		r.Get("/v1/backup", s.backup)
		r.Get("/v1/kek", s.kekStatus)
		r.Post("/v1/kek/rotate", s.kekRotate)
		r.Post("/v1/kek/{id}/retire", s.kekRetire)
		r.Post("/v1/tokens/introspect", allow(kms.PermIntrospect, s.introspect))
		r.Get("/v1/tokens", allow(kms.PermManageTokens, s.listTokens))
		r.Get("/v1/tokens/{id}", allow(kms.PermManageTokens, s.getToken))
		r.Post("/v1/tokens/self/renew", s.renewToken)
		r.Delete("/v1/tokens/{id}", allow(kms.PermManageTokens, s.revokeToken))
		r.Get("/v1/keys/{name}/versions/{version}/evaluation-keys", allow(kms.PermReadKey, s.manifest))
		r.Get("/v1/keys/{name}/versions/{version}/evaluation-keys/signature", allow(kms.PermReadKey, s.manifestSignature))
		r.Post("/v1/keys/{name}/versions/{version}/evaluation-keys", allow(kms.PermExtendKeys, s.galoisKeys))
		r.Get("/v1/keys/{name}/versions/{version}/evaluation-keys/extension", allow(kms.PermReadKey, s.extension))
		r.Post("/v1/keys/{name}/versions/{version}/switching-keys", allow(kms.PermManageKey, s.switchingKey))
		r.Get("/v1/blobs/sha256/{hex}", s.blob) // authorized against the blob's key inside
		r.Head("/v1/blobs/sha256/{hex}", s.blob)
		r.Post("/v1/keys/{name}/versions/{version}/decrypt", allow(kms.PermDecrypt, s.decrypt))
		r.Post("/v1/keys/{name}/versions/{version}/threshold-decrypt", allow(kms.PermDecrypt, s.thresholdDecrypt))
		// attest: the op's permission (attest-input or -evaluation) is
		// checked inside.
		r.Post("/v1/keys/{name}/versions/{version}/attest", allow(kms.PermReadKey, s.attest))
		r.Get("/v1/operations/{id}", s.operation) // authorized against the operation's key inside
		if s.opts.Audit != nil && s.opts.Prover != nil {
			r.Get("/v1/audit/checkpoint", allow(kms.PermReadAudit, s.auditCheckpoint))
			r.Get("/v1/audit/records", allow(kms.PermReadAudit, s.auditRecords))
			r.Get("/v1/audit/proof/inclusion", allow(kms.PermReadAudit, s.auditInclusion))
			r.Get("/v1/audit/proof/consistency", allow(kms.PermReadAudit, s.auditConsistency))
			r.Get("/v1/audit/tiles/*", allow(kms.PermReadAudit, s.auditTile))
		}
	})
	return r
}
