package api

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/go-chi/chi/v5"

	"github.com/kmsd-project/kmsd/api/client"
	"github.com/kmsd-project/kmsd/kms"
	"github.com/kmsd-project/kmsd/kms/wire"
)

// readBody decodes the request body into v or writes the problem and
// returns false.
func readBody(w http.ResponseWriter, r *http.Request, v any, optional bool) bool {
	err := decode(r, v, optional)
	var de *decodeError
	switch {
	case err == nil:
		return true
	case errors.Is(err, errBodyTooLarge):
		writeProblem(w, r, http.StatusRequestEntityTooLarge, ProbBodyTooLarge, err.Error())
	case errors.Is(err, errMedia):
		writeProblem(w, r, http.StatusUnsupportedMediaType, ProbUnsupportedMedia, err.Error())
	case errors.As(err, &de):
		writeProblem(w, r, http.StatusBadRequest, ProbInvalid, de.msg)
	default:
		writeProblem(w, r, http.StatusBadRequest, ProbInvalid, "malformed request body")
	}
	return false
}

// versionParam parses {version}: a positive number or "primary" (0).
func versionParam(r *http.Request) (uint64, error) {
	s := chi.URLParam(r, "version")
	if s == "primary" {
		return 0, nil
	}
	n, err := strconv.ParseUint(s, 10, 32)
	if err != nil || n == 0 || (len(s) > 1 && s[0] == '0') {
		return 0, kms.Errorf(kms.KindInvalid, "version must be a positive number or \"primary\"")
	}
	return n, nil
}

func toVersion(k *kms.Key, v *kms.Version) client.Version {
	return client.Version{Name: k.Name, Version: v.Number, State: string(v.State), Primary: v.Number == k.Primary,
		CreatedAt: v.CreatedAt, DestroyAt: v.DestroyAt, DestroyedAt: v.DestroyedAt}
}

// toKey renders a key's header and the versions given (none: the field is
// left out).
func toKey(k *kms.Key, vs []*kms.Version, next uint64) client.Key {
	out := client.Key{Name: k.Name, Kind: k.Kind, CreatedAt: k.CreatedAt, PrimaryVersion: k.Primary,
		LatestVersion: k.Latest, MinDecryptionVersion: k.MinDecryptionVersion,
		Policy: toPolicy(k.Policy), Versions: toVersions(k, vs), NextVersionsPageToken: versionsPageToken(k.Name, next)}
	if t, ok := k.NextRotation(); ok {
		t = t.UTC()
		out.NextRotationTime = &t
	}
	return out
}

func toVersions(k *kms.Key, vs []*kms.Version) []client.Version {
	if len(vs) == 0 {
		return nil
	}
	out := make([]client.Version, len(vs))
	for i, v := range vs {
		out[i] = toVersion(k, v)
	}
	return out
}

// paramsOut is a policy's params as answers carry them: a preset name as
// it is, a parameters literal as a JSON string holding its compact text, so
// that its 64-bit moduli reach every JSON parser exact. Create and update
// take either form back.
func paramsOut(p json.RawMessage) json.RawMessage {
	if len(p) == 0 || p[0] != '{' {
		return p
	}
	var buf bytes.Buffer
	if err := json.Compact(&buf, p); err != nil {
		return p
	}
	out, err := json.Marshal(buf.String())
	if err != nil {
		return p
	}
	return out
}

// versionsPageToken continues a key's versions below next ("" at the
// end).
func versionsPageToken(name string, next uint64) string {
	if next == 0 {
		return ""
	}
	return encodePageToken("versions", name, strconv.FormatUint(next, 10))
}

func toPolicy(p kms.Policy) client.Policy {
	out := client.Policy{DestroyWaitDays: p.DestroyWaitDays, Params: paramsOut(p.Params), Rotations: p.Rotations, Conjugation: p.Conjugation, Relinearization: p.Relinearization,
		DecryptLogPrecision: p.DecryptLogPrecision, DecryptBudget: p.DecryptBudget, OnDemandGaloisKeys: p.OnDemandGaloisKeys}
	if t := p.Threshold; t != nil {
		out.Threshold = &client.ThresholdPolicy{Parties: t.Parties, T: t.T, Requesters: t.Requesters}
	}
	if p.RotationPeriod > 0 {
		out.RotationPeriod = kms.FormatPeriod(p.RotationPeriod)
	}
	for _, op := range p.AllowedOperations {
		out.AllowedOperations = append(out.AllowedOperations, string(op))
	}
	return out
}

func fromPolicy(p *client.Policy) (kms.Policy, error) {
	if p == nil {
		return kms.Policy{}, nil
	}
	out := kms.Policy{DestroyWaitDays: p.DestroyWaitDays, Params: p.Params, Rotations: p.Rotations, Conjugation: p.Conjugation, Relinearization: p.Relinearization,
		DecryptLogPrecision: p.DecryptLogPrecision, DecryptBudget: p.DecryptBudget, OnDemandGaloisKeys: p.OnDemandGaloisKeys}
	if t := p.Threshold; t != nil {
		out.Threshold = &kms.ThresholdPolicy{Parties: t.Parties, T: t.T, Requesters: t.Requesters}
	}
	if p.RotationPeriod != "" {
		d, err := time.ParseDuration(p.RotationPeriod)
		if err != nil {
			return out, kms.Errorf(kms.KindInvalid, "rotation_period %q is not a duration: give hours, minutes or seconds, as in \"720h\" or \"90m\" (days are not a unit)", clipField(p.RotationPeriod, 40))
		}
		if d <= 0 {
			return out, kms.Errorf(kms.KindInvalid, "rotation_period must be positive (to turn scheduled rotation off, set it to null or \"\")")
		}
		out.RotationPeriod = d
	}
	for _, op := range p.AllowedOperations {
		out.AllowedOperations = append(out.AllowedOperations, kms.Operation(op))
	}
	return out, nil
}

func (s *Server) healthz(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, client.Health{Status: "ok"})
}

func (s *Server) readyz(w http.ResponseWriter, r *http.Request) {
	if err := s.svc.Ready(r.Context()); err != nil {
		writeError(w, r, err)
		return
	}
	h := client.Health{Status: "ready", BlobsFailingDigest: s.blobs.failing()}
	if s.opts.ArchiveStatus != nil {
		h.AuditArchive = s.opts.ArchiveStatus(r.Context())
	}
	writeJSON(w, http.StatusOK, h)
}

func (s *Server) identity(w http.ResponseWriter, r *http.Request) {
	v, pub, err := s.svc.Identity(r.Context())
	if err != nil {
		writeError(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, client.Identity{Algorithm: kms.IdentityKind, Version: v, PublicKey: pub})
}

func (s *Server) createKey(w http.ResponseWriter, r *http.Request) {
	var req client.CreateKeyRequest
	if !readBody(w, r, &req, false) {
		return
	}
	ev := eventFrom(r)
	ev.key = req.Name
	if err := kms.ValidateName(req.Name); err != nil {
		writeError(w, r, err)
		return
	}
	if err := ev.principal.Authorize(kms.PermManageKey, req.Name); err != nil {
		writeError(w, r, err)
		return
	}
	pending(r, http.StatusCreated)
	p, err := fromPolicy(req.Policy)
	if err != nil {
		writeError(w, r, err)
		return
	}
	if p.Threshold != nil {
		s.createThresholdKey(w, r, req.Name, req.Kind, p)
		return
	}
	k, v, job, err := s.call(r).CreateKeyAsync(r.Context(), s.opts.Background, s.backgroundRecord(r), req.Name, req.Kind, p)
	if err != nil {
		writeError(w, r, err)
		return
	}
	if job != nil {
		s.accepted(w, r, job)
		return
	}
	w.Header().Set("Location", "/v1/keys/"+url.PathEscape(k.Name))
	writeJSON(w, http.StatusCreated, toKey(k, []*kms.Version{v}, 0))
}

// limitParam parses the optional limit query parameter (default 100).
func limitParam(w http.ResponseWriter, r *http.Request) (int, bool) {
	l := r.URL.Query().Get("limit")
	if l == "" {
		return 100, true
	}
	n, err := strconv.Atoi(l)
	if err != nil || n < 1 || n > 1000 {
		writeProblem(w, r, http.StatusBadRequest, ProbInvalid, "limit must be a number from 1 to 1000")
		return 0, false
	}
	return n, true
}

func (s *Server) listKeys(w http.ResponseWriter, r *http.Request) {
	limit, ok := limitParam(w, r)
	if !ok {
		return
	}
	after, ok := pagePosition(w, r, "keys", "", func(p string) bool { return kms.ValidateName(p) == nil })
	if !ok {
		return
	}
	p := eventFrom(r).principal
	keys, next, err := s.svc.ListKeys(r.Context(), after, limit, p.MayUse)
	if err != nil {
		writeError(w, r, err)
		return
	}
	out := client.KeyList{Keys: make([]client.Key, 0, len(keys)), NextPageToken: encodePageToken("keys", "", next)}
	for _, k := range keys {
		out.Keys = append(out.Keys, toKey(k, nil, 0))
	}
	writeJSON(w, http.StatusOK, out)
}

func (s *Server) getKey(w http.ResponseWriter, r *http.Request) {
	limit, ok := limitParam(w, r)
	if !ok {
		return
	}
	k, vs, next, err := s.svc.GetKey(r.Context(), chi.URLParam(r, "name"), 0, limit)
	if err != nil {
		writeError(w, r, err)
		return
	}
	// An ETag of the answer's bytes lets a worker poll for rotations and
	// state changes with If-None-Match: 304 while nothing changed.
	body, err := json.Marshal(toKey(k, vs, next))
	if err != nil {
		writeError(w, r, err)
		return
	}
	body = append(body, '\n')
	sum := sha256.Sum256(body)
	etag := `"sha256:` + hex.EncodeToString(sum[:]) + `"`
	w.Header().Set("ETag", etag)
	w.Header().Set("Cache-Control", "no-cache")
	if inm := r.Header.Get("If-None-Match"); inm != "" && etagMatches(inm, etag) {
		w.WriteHeader(http.StatusNotModified)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusOK)
	_, _ = w.Write(body)
}

// etagMatches says whether an If-None-Match value names etag.
func etagMatches(inm, etag string) bool {
	for _, t := range strings.Split(inm, ",") {
		if t = strings.TrimSpace(t); t == etag || t == "*" {
			return true
		}
	}
	return false
}

// listVersions pages through a key's versions, newest first.
func (s *Server) listVersions(w http.ResponseWriter, r *http.Request) {
	limit, ok := limitParam(w, r)
	if !ok {
		return
	}
	var before uint64
	name := chi.URLParam(r, "name")
	pos, ok := pagePosition(w, r, "versions", name, func(p string) bool {
		n, err := strconv.ParseUint(p, 10, 32)
		return err == nil && n >= 2 && p[0] != '0'
	})
	if !ok {
		return
	}
	if pos != "" {
		before, _ = strconv.ParseUint(pos, 10, 32)
	}
	k, vs, next, err := s.svc.GetKey(r.Context(), name, before, limit)
	if err != nil {
		writeError(w, r, err)
		return
	}
	out := client.VersionList{Versions: toVersions(k, vs), NextPageToken: versionsPageToken(k.Name, next)}
	if out.Versions == nil {
		out.Versions = []client.Version{}
	}
	writeJSON(w, http.StatusOK, out)
}

func (s *Server) updateKey(w http.ResponseWriter, r *http.Request) {
	var req struct {
		Policy               json.RawMessage `json:"policy"`
		MinDecryptionVersion *uint64         `json:"min_decryption_version"`
	}
	if !readBody(w, r, &req, false) {
		return
	}
	if req.Policy == nil && req.MinDecryptionVersion == nil {
		writeProblem(w, r, http.StatusBadRequest, ProbInvalid, "nothing to change: give policy or min_decryption_version")
		return
	}
	u := kms.KeyUpdate{MinDecryptionVersion: req.MinDecryptionVersion}
	if req.Policy != nil {
		patch, err := policyPatcher(req.Policy)
		if err != nil {
			writeProblem(w, r, http.StatusBadRequest, ProbInvalid, err.Error())
			return
		}
		u.PatchPolicy = patch
	}
	pending(r, http.StatusOK)
	k, err := s.call(r).UpdateKey(r.Context(), chi.URLParam(r, "name"), u)
	if err != nil {
		writeError(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, toKey(k, nil, 0))
}

func (s *Server) rotate(w http.ResponseWriter, r *http.Request) {
	var req struct{}
	if !readBody(w, r, &req, true) {
		return
	}
	pending(r, http.StatusCreated)
	if k, err := s.svc.GetKeyHeader(r.Context(), chi.URLParam(r, "name")); err == nil && k.Policy.Threshold != nil {
		s.rotateThreshold(w, r, k.Name)
		return
	}
	k, v, job, err := s.call(r).RotateAsync(r.Context(), s.opts.Background, s.backgroundRecord(r), chi.URLParam(r, "name"))
	if err != nil {
		writeError(w, r, err)
		return
	}
	if job != nil {
		s.accepted(w, r, job)
		return
	}
	w.Header().Set("Location", fmt.Sprintf("/v1/keys/%s/versions/%d/public-key", url.PathEscape(k.Name), v.Number))
	writeJSON(w, http.StatusCreated, toVersion(k, v))
}

func (s *Server) publicKey(w http.ResponseWriter, r *http.Request) {
	n, err := versionParam(r)
	if err != nil {
		writeError(w, r, err)
		return
	}
	k, v, err := s.svc.PublicKey(r.Context(), chi.URLParam(r, "name"), n)
	if err != nil {
		writeError(w, r, err)
		return
	}
	eventFrom(r).version = v.Number
	out := client.PublicKey{Name: k.Name, Version: v.Number, Kind: k.Kind, PublicKey: v.PublicKey}
	if v.Manifest != nil {
		var m kms.Manifest
		if err := json.Unmarshal(v.Manifest, &m); err != nil {
			writeError(w, r, kms.Wrap(kms.KindInternal, "manifest", err))
			return
		}
		out.Digest, out.Size, out.URL = m.PublicKey.Digest, m.PublicKey.Size, blobURL(m.PublicKey.Digest)
		if m.PublicKey.Form == wire.FormSeeded {
			// The public key as every Lattigo client reads it: the full
			// form, expanded by kmsd.
			out.Digest, out.Size, out.URL = m.PublicKey.FullDigest, m.PublicKey.FullSize, blobURL(m.PublicKey.Digest)+"?form=full"
		}
	}
	writeJSON(w, http.StatusOK, out)
}

func (s *Server) versionAction(a kms.Action) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		n, err := versionParam(r)
		if err != nil {
			writeError(w, r, err)
			return
		}
		if n == 0 {
			writeProblem(w, r, http.StatusBadRequest, ProbInvalid, "name a version number: the primary version's state cannot be changed this way")
			return
		}
		days := 0
		if a == kms.ActScheduleDestroy {
			var req client.ScheduleDestroyRequest
			if !readBody(w, r, &req, true) {
				return
			}
			if req.Days < 0 {
				writeProblem(w, r, http.StatusBadRequest, ProbInvalid, "days must be between 1 and 365")
				return
			}
			days = req.Days
		} else {
			var req struct{}
			if !readBody(w, r, &req, true) {
				return
			}
		}
		name := chi.URLParam(r, "name")
		eventFrom(r).version = n
		pending(r, http.StatusOK)
		v, err := s.call(r).SetVersionState(r.Context(), name, n, a, days)
		if err != nil {
			writeError(w, r, err)
			return
		}
		k := &kms.Key{Name: name}
		writeJSON(w, http.StatusOK, toVersion(k, v))
	}
}

func (s *Server) sign(w http.ResponseWriter, r *http.Request) {
	var req client.SignRequest
	if !readBody(w, r, &req, false) {
		return
	}
	if req.Message == nil {
		writeProblem(w, r, http.StatusBadRequest, ProbInvalid, "message is required")
		return
	}
	sig, v, err := s.svc.Sign(r.Context(), chi.URLParam(r, "name"), req.Message, req.Context)
	if err != nil {
		writeError(w, r, err)
		return
	}
	eventFrom(r).version = v
	writeJSON(w, http.StatusOK, client.SignResponse{Signature: sig, Version: v})
}

func (s *Server) verify(w http.ResponseWriter, r *http.Request) {
	var req client.VerifyRequest
	if !readBody(w, r, &req, false) {
		return
	}
	if req.Message == nil || req.Signature == nil || req.Version == 0 {
		writeProblem(w, r, http.StatusBadRequest, ProbInvalid, "message, signature and version are required")
		return
	}
	eventFrom(r).version = req.Version
	ok, err := s.svc.Verify(r.Context(), chi.URLParam(r, "name"), req.Version, req.Message, req.Context, req.Signature)
	if err != nil {
		writeError(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, client.VerifyResponse{Valid: ok})
}

func (s *Server) decapsulate(w http.ResponseWriter, r *http.Request) {
	var req client.DecapsulateRequest
	if !readBody(w, r, &req, false) {
		return
	}
	if req.Ciphertext == nil || req.Version == 0 {
		writeProblem(w, r, http.StatusBadRequest, ProbInvalid, "ciphertext and version are required")
		return
	}
	eventFrom(r).version = req.Version
	ss, err := s.svc.Decapsulate(r.Context(), chi.URLParam(r, "name"), req.Version, req.Ciphertext)
	if err != nil {
		writeError(w, r, err)
		return
	}
	defer ss.Wipe()
	writeJSON(w, http.StatusOK, client.DecapsulateResponse{SharedSecret: ss.Reveal(), Version: req.Version})
}

func toTokenInfo(t *kms.Token) client.TokenInfo {
	ti := client.TokenInfo{ID: t.ID, Name: t.Name, Role: string(t.Role), Keys: t.Keys, CreatedAt: t.CreatedAt, CreatedBy: t.CreatedBy,
		ExpiresAt: t.ExpiresAt, LastUsedAt: t.LastUsedAt, RevokedAt: t.RevokedAt, MaxExpiresAt: t.MaxExpiresAt, RenewedAt: t.RenewedAt, Audience: t.Audience}
	if t.TTL > 0 {
		ti.TTL = t.TTL.String()
	}
	return ti
}

// introspect answers whether a token is active and what it may do (RFC
// 7662's shape, JSON in and out). The token in the body is never logged or
// recorded; only the caller's token id is.
func (s *Server) introspect(w http.ResponseWriter, r *http.Request) {
	var req client.IntrospectRequest
	if !readBody(w, r, &req, false) {
		return
	}
	p, err := s.svc.Introspect(r.Context(), req.Token)
	if err != nil {
		writeError(w, r, err)
		return
	}
	out := client.Introspection{}
	if p != nil {
		// The token checked is named in the record (its id, never its
		// secret), in scope or not.
		eventFrom(r).rec.Token = p.TokenID
	}
	if p != nil && !eventFrom(r).principal.MayIntrospect(p) {
		p = nil // beyond the caller's scope: active=false
	}
	if p != nil {
		out = client.Introspection{Active: true, TokenType: "Bearer", TokenID: p.TokenID, Role: string(p.Role), Keys: p.Keys, Aud: p.Audience,
			ClientID: p.Client, Scope: kms.Scope(p.Role, p.Keys)}
		if p.ExpiresAt != nil {
			out.Exp = p.ExpiresAt.Unix()
		}
	}
	w.Header().Set("Cache-Control", "no-store")
	writeJSON(w, http.StatusOK, out)
}

func (s *Server) createToken(w http.ResponseWriter, r *http.Request) {
	var req client.CreateTokenRequest
	if !readBody(w, r, &req, false) {
		return
	}
	var ttl, maxLife time.Duration
	for _, f := range []struct {
		name, v string
		d       *time.Duration
	}{{"ttl", req.TTL, &ttl}, {"max_lifetime", req.MaxLifetime, &maxLife}} {
		if f.v == "" {
			continue
		}
		d, err := time.ParseDuration(f.v)
		if err != nil || d <= 0 {
			writeProblem(w, r, http.StatusBadRequest, ProbInvalid, f.name+" must be a positive duration such as \"90m\" or \"720h\"")
			return
		}
		*f.d = d
	}
	pending(r, http.StatusCreated)
	tok, t, err := s.call(r).CreateToken(r.Context(), eventFrom(r).principal, kms.TokenRequest{Name: req.Name, Role: kms.Role(req.Role), Keys: req.Keys, TTL: ttl, MaxLifetime: maxLife, Audience: req.Audience})
	if err != nil {
		writeError(w, r, err)
		return
	}
	w.Header().Set("Location", "/v1/tokens/"+t.ID)
	writeJSON(w, http.StatusCreated, client.Token{TokenInfo: toTokenInfo(t), Token: tok})
}

func (s *Server) listTokens(w http.ResponseWriter, r *http.Request) {
	limit, ok := limitParam(w, r)
	if !ok {
		return
	}
	after, ok := pagePosition(w, r, "tokens", "", kms.ValidTokenID)
	if !ok {
		return
	}
	toks, next, err := s.svc.ListTokens(r.Context(), eventFrom(r).principal, after, limit)
	if err != nil {
		writeError(w, r, err)
		return
	}
	out := client.TokenList{Tokens: make([]client.TokenInfo, 0, len(toks)), NextPageToken: encodePageToken("tokens", "", next)}
	for _, t := range toks {
		out.Tokens = append(out.Tokens, toTokenInfo(t))
	}
	writeJSON(w, http.StatusOK, out)
}

func (s *Server) getToken(w http.ResponseWriter, r *http.Request) {
	t, err := s.svc.GetToken(r.Context(), eventFrom(r).principal, chi.URLParam(r, "id"))
	if err != nil {
		writeError(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, toTokenInfo(t))
}

// renewToken extends the caller's own token (any role: a token renews
// itself only).
func (s *Server) renewToken(w http.ResponseWriter, r *http.Request) {
	p := eventFrom(r).principal
	if p == nil {
		writeError(w, r, kms.Errorf(kms.KindUnauthenticated, "a bearer token is required"))
		return
	}
	pending(r, http.StatusOK)
	t, err := s.call(r).RenewToken(r.Context(), p)
	if err != nil {
		writeError(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, toTokenInfo(t))
}

func (s *Server) revokeToken(w http.ResponseWriter, r *http.Request) {
	pending(r, http.StatusOK)
	t, err := s.call(r).RevokeToken(r.Context(), eventFrom(r).principal, chi.URLParam(r, "id"))
	if err != nil {
		writeError(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, toTokenInfo(t))
}
