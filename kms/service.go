package kms

import (
	"context"
	"crypto/rand"
	"errors"
	"io"
	"log/slog"
	mrand "math/rand/v2"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// Config wires a Service.
type Config struct {
	Store  Store
	Sealer Sealer
	Kinds  Registry
	Clock  Clock     // default SystemClock
	Rand   io.Reader // default crypto/rand.Reader
	Logger *slog.Logger
	// CacheTTL bounds how long unsealed private keys stay in memory after
	// they were unsealed. Zero means the default (5 minutes); a negative
	// value turns the cache off.
	CacheTTL time.Duration
	// CacheSize bounds how many unsealed keys are held at once (default 1024).
	CacheSize int
	// RecordCacheSize bounds how many decoded key headers, versions and
	// tokens each are held in memory (default 4096); negative: off. The
	// cache follows the store's change feed (Store.Watch).
	RecordCacheSize int
	// StaleBound: on a store whose change feed can lag (kms.Freshness),
	// a cached record is served only while the feed is fresh within it;
	// otherwise the record is read from the store (default 1 s).
	StaleBound time.Duration
	// MaxKeysetBytes refuses HE keys whose keyset would be larger (default
	// 4 GiB). MaxGenerations bounds HE keyset generations at once (default
	// 1); past it, requests are refused with "exhausted" (429).
	MaxKeysetBytes int64
	MaxGenerations int
	// AsyncKeysetBytes: keysets larger than this are generated in the
	// background by CreateKeyAsync and RotateAsync (default 64 MiB).
	AsyncKeysetBytes int64
	// MaxTokenTTL bounds the lifetime of tokens created through the API;
	// a token created without a ttl gets this one. Zero: no maximum, and
	// tokens without a ttl do not expire.
	MaxTokenTTL time.Duration
	// Audit makes the service record the actions it takes on its own
	// (scheduled destruction, bootstrap) in the audit log. Records of
	// requests come with the request (Service.For).
	Audit bool
	// MinRotationPeriod is the shortest rotation_period a policy may set
	// (default 1 hour); RotationCheckInterval is how often RunRotation
	// looks for keys due (default 1 minute).
	MinRotationPeriod     time.Duration
	RotationCheckInterval time.Duration
	// Peers are the kmsd nodes threshold keys are shared with (nil:
	// none).
	Peers Peers
}

// Service is the domain: every operation on keys and tokens goes through it.
type Service struct {
	store  Store
	sealer Sealer
	kinds  Registry
	clock  Clock
	rand   io.Reader
	log    *slog.Logger
	cache  *keyCache
	rc     *readCache
	fresh  Freshness // nil: the change feed never lags (one process)
	bound  time.Duration
	audit  bool

	maxTokenTTL time.Duration
	uses        tokenUses
	revokeMu    sync.Mutex

	maxKeyset   int64
	asyncBytes  int64
	generations chan struct{}
	// extensions bounds the generations of keys for existing versions
	// (Galois keys on demand, switching keys) at once; extendLocks
	// serializes those of one version.
	extensions  chan struct{}
	extendLocks versionLocks
	extendJobs  atomic.Int64
	peers       Peers
	thr         thrRuns
	counts      counts
	jobs        jobs

	locksMu sync.Mutex
	locks   map[string]*sync.Mutex // per-key locks that serialize rotations

	seals sealFence // new material from its seal to its commit

	minRotation   time.Duration
	rotationEvery time.Duration
	rot           rotationState
}

// NewService builds a Service.
func NewService(cfg Config) (*Service, error) {
	if cfg.Store == nil || cfg.Sealer == nil || len(cfg.Kinds) == 0 {
		return nil, errors.New("kms: NewService needs a Store, a Sealer and at least one key kind")
	}
	s := &Service{
		store: cfg.Store, sealer: cfg.Sealer, kinds: cfg.Kinds,
		clock: cfg.Clock, rand: cfg.Rand, log: cfg.Logger, audit: cfg.Audit, maxTokenTTL: cfg.MaxTokenTTL,
		locks: map[string]*sync.Mutex{},
	}
	if s.clock == nil {
		s.clock = SystemClock{}
	}
	if s.rand == nil {
		s.rand = rand.Reader
	}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	s.maxKeyset = cfg.MaxKeysetBytes
	if s.maxKeyset <= 0 {
		s.maxKeyset = 4 << 30
	}
	if cfg.MaxGenerations <= 0 {
		cfg.MaxGenerations = 1
	}
	s.generations = make(chan struct{}, cfg.MaxGenerations)
	s.extensions = make(chan struct{}, cfg.MaxGenerations)
	s.peers = cfg.Peers
	s.thr.m = map[string]*thrRun{}
	s.jobs.m = map[string]*Job{}
	s.asyncBytes = cfg.AsyncKeysetBytes
	if s.asyncBytes <= 0 {
		s.asyncBytes = 64 << 20
	}
	ttl, size := cfg.CacheTTL, cfg.CacheSize
	if ttl == 0 {
		ttl = 5 * time.Minute
	}
	if size <= 0 {
		size = 1024
	}
	s.cache = newKeyCache(ttl, size, s.clock)
	if cfg.RecordCacheSize == 0 {
		cfg.RecordCacheSize = 4096
	}
	s.rc = newReadCache(cfg.RecordCacheSize)
	s.fresh, _ = cfg.Store.(Freshness)
	s.bound = cfg.StaleBound
	if s.bound <= 0 {
		s.bound = time.Second
	}
	s.minRotation, s.rotationEvery = cfg.MinRotationPeriod, cfg.RotationCheckInterval
	if s.minRotation <= 0 {
		s.minRotation = DefaultMinRotationPeriod
	}
	if s.rotationEvery <= 0 {
		s.rotationEvery = time.Minute
	}
	s.store.Watch(s.rc.invalidate)
	return s, nil
}

func (s *Service) keyLock(name string) *sync.Mutex {
	s.locksMu.Lock()
	defer s.locksMu.Unlock()
	m, ok := s.locks[name]
	if !ok {
		m = &sync.Mutex{}
		s.locks[name] = m
	}
	return m
}

// Ready checks the store and the HSM.
func (s *Service) Ready(ctx context.Context) error {
	if err := s.store.Ping(ctx); err != nil {
		return Wrap(KindUnavailable, "store", err)
	}
	if err := s.sealer.Ping(ctx); err != nil {
		return Wrap(KindUnavailable, "hsm", err)
	}
	return nil
}

func (s *Service) checkPolicy(kind KeyKind, p Policy) (Policy, error) {
	if err := s.checkThreshold(kind, p); err != nil {
		return p, err
	}
	if kk, ok := kind.(KeysetKind); ok {
		var size int64
		var err error
		if p, size, err = kk.CheckPolicy(p); err != nil {
			return p, err
		}
		if size > s.maxKeyset {
			return p, Errorf(KindTooLarge, "the keyset would be %d MiB, above the limit of %d MiB", size>>20, s.maxKeyset>>20)
		}
	} else if p.hasKeysetFields() {
		return p, Errorf(KindInvalid, "params, rotations, conjugation and relinearization apply to HE kinds (ckks, bgv) only")
	}
	if p.DestroyWaitDays == 0 {
		p.DestroyWaitDays = DefaultDestroyWaitDays
	}
	if p.DestroyWaitDays < MinDestroyWaitDays || p.DestroyWaitDays > MaxDestroyWaitDays {
		return p, Errorf(KindInvalid, "destroy_wait_days must be between %d and %d", MinDestroyWaitDays, MaxDestroyWaitDays)
	}
	if err := s.checkRotationPeriod(p.RotationPeriod); err != nil {
		return p, err
	}
	ops := kind.Operations()
	var seen []Operation
	for _, op := range p.AllowedOperations {
		if !slices.Contains(ops, op) {
			return p, Errorf(KindInvalid, "operation %q is not offered by kind %s (it offers %v)", clip(string(op), 40), kind.Name(), ops)
		}
		if slices.Contains(seen, op) {
			return p, Errorf(KindInvalid, "operation %q is listed twice", op)
		}
		seen = append(seen, op)
	}
	return p, nil
}

// newVersion generates and seals material for version n of a key. Nothing
// is stored; for HE kinds the keyset's blobs are written (and must be
// discarded if the version does not commit).
//
// The material is sealed last, and the returned release must be called
// once the version committed or was discarded: from the seal to then, a
// KEK rotation or retire in this process waits (DrainSeals), so no version is
// committed sealed under a KEK destroyed meanwhile.
func (s *Service) newVersion(ctx context.Context, name string, kind KeyKind, n uint64, p Policy) (Version, func(), error) {
	if kk, ok := kind.(KeysetKind); ok {
		return s.newKeysetVersion(ctx, name, kk, n, p)
	}
	secret, pub, err := kind.Generate(s.rand)
	if err != nil {
		return Version{}, nil, Wrap(KindInternal, "generate "+kind.Name(), err)
	}
	defer secret.Wipe()
	release := s.seals.enter()
	sealed, err := s.sealer.Seal(ctx, SealContext{Key: name, Version: n, Kind: kind.Name()}, secret)
	if err != nil {
		release()
		return Version{}, nil, asUnavailable("seal", err)
	}
	return Version{Number: n, State: StateEnabled, CreatedAt: s.clock.Now(), PublicKey: pub, Sealed: sealed}, release, nil
}

// asUnavailable keeps an *Error's kind and makes anything else "unavailable":
// an HSM or disk that fails is a 5xx the client may retry.
func asUnavailable(op string, err error) error {
	var e *Error
	if errors.As(err, &e) {
		return err
	}
	return Wrap(KindUnavailable, op, err)
}

// CreateKey generates version 1 of a new key and stores it.
func (c Call) CreateKey(ctx context.Context, name, kindName string, p Policy) (*Key, *Version, error) {
	s := c.Service
	if err := ValidateName(name); err != nil {
		return nil, nil, err
	}
	return s.createKey(ctx, name, kindName, p, auditFor(c.rec, name, 1))
}

// CreateKey is For(nil).CreateKey: a key made without a request's audit
// record (start-up, tests).
func (s *Service) CreateKey(ctx context.Context, name, kindName string, p Policy) (*Key, *Version, error) {
	return s.For(nil).CreateKey(ctx, name, kindName, p)
}

func (s *Service) createKey(ctx context.Context, name, kindName string, p Policy, audit []*AuditRecord) (*Key, *Version, error) {
	kind, err := s.kinds.Lookup(kindName)
	if err != nil {
		return nil, nil, err
	}
	if p, err = s.checkPolicy(kind, p); err != nil {
		return nil, nil, err
	}
	if _, err := s.store.GetKey(ctx, name); err == nil {
		return nil, nil, Errorf(KindAlreadyExists, "key %q already exists", name)
	} else if !errors.Is(err, ErrNotFound) {
		return nil, nil, asUnavailable("store", err)
	}
	if p.Threshold != nil {
		return nil, nil, Errorf(KindInvalid, "a threshold key is made by its parties together (CreateThresholdKey)")
	}
	v, release, err := s.newVersion(ctx, name, kind, 1, p)
	if err != nil {
		return nil, nil, err
	}
	defer release()
	k := &Key{Name: name, Kind: kind.Name(), Policy: p, CreatedAt: v.CreatedAt, Primary: 1, Latest: 1, MinDecryptionVersion: 1, LatestCreatedAt: v.CreatedAt}
	if err := s.store.CreateKey(ctx, k, &v, audit); err != nil {
		s.discard(kind, v)
		if errors.Is(err, ErrAlreadyExists) {
			return nil, nil, Errorf(KindAlreadyExists, "key %q already exists", name)
		}
		return nil, nil, asUnavailable("store", err)
	}
	return k, &v, nil
}

// GetKey returns a key's header and up to limit of its versions numbered
// below `before` (0: from the latest), newest first, and the number to
// continue below (0 when none is left). Internal keys are not found.
func (s *Service) GetKey(ctx context.Context, name string, before uint64, limit int) (*Key, []*Version, uint64, error) {
	if err := ValidateName(name); err != nil {
		return nil, nil, 0, err
	}
	// The header and the versions of one snapshot: a version newer than
	// the header's latest_version never comes with it.
	return s.listVersions(ctx, name, before, limit)
}

func (s *Service) listVersions(ctx context.Context, name string, before uint64, limit int) (*Key, []*Version, uint64, error) {
	if limit <= 0 || limit > MaxVersionsPage {
		return nil, nil, 0, Errorf(KindInvalid, "limit must be between 1 and %d", MaxVersionsPage)
	}
	k, vs, err := s.store.ListVersions(ctx, name, before, limit)
	if errors.Is(err, ErrNotFound) {
		return nil, nil, 0, Errorf(KindNotFound, "key %q not found", name)
	}
	if err != nil {
		return nil, nil, 0, asUnavailable("store", err)
	}
	var next uint64
	// Versions are numbered 1..Latest without gaps: a full page that did
	// not reach version 1 has more below it.
	if len(vs) == limit && vs[len(vs)-1].Number > 1 {
		next = vs[len(vs)-1].Number
	}
	return k, vs, next, nil
}

// getKey reads a key's header from the store (not the cache): for the
// administrative paths that must see the newest.
func (s *Service) getKey(ctx context.Context, name string) (*Key, error) {
	k, err := s.store.GetKey(ctx, name)
	return k, s.keyErr(name, err)
}

func (s *Service) keyErr(name string, err error) error {
	if errors.Is(err, ErrNotFound) {
		return Errorf(KindNotFound, "key %q not found", name)
	}
	if err != nil {
		return asUnavailable("store", err)
	}
	return nil
}

// ListKeys returns up to limit key headers after the name `after` that filter
// accepts (nil accepts all), and the name to continue after ("" at the end).
func (s *Service) ListKeys(ctx context.Context, after string, limit int, filter func(name string) bool) ([]*Key, string, error) {
	if limit <= 0 || limit > 1000 {
		return nil, "", Errorf(KindInvalid, "limit must be between 1 and 1000")
	}
	var out []*Key
	for {
		batch, err := s.store.ListKeys(ctx, after, limit+1)
		if err != nil {
			return nil, "", asUnavailable("store", err)
		}
		for _, k := range batch {
			after = k.Name
			if IsInternal(k.Name) || (filter != nil && !filter(k.Name)) {
				continue
			}
			if len(out) == limit {
				// One more exists: the page ends after the last one kept.
				return out, out[len(out)-1].Name, nil
			}
			out = append(out, k)
		}
		if len(batch) < limit+1 {
			return out, "", nil
		}
	}
}

// KeyUpdate is a PATCH: nil fields are left as they are.
type KeyUpdate struct {
	// PatchPolicy makes the new policy from the current one, inside the
	// update's transaction (so a concurrent change is never undone).
	PatchPolicy          func(Policy) (Policy, error)
	MinDecryptionVersion *uint64
}

// UpdateKey changes a key's policy or min_decryption_version.
func (c Call) UpdateKey(ctx context.Context, name string, u KeyUpdate) (*Key, error) {
	s := c.Service
	if err := ValidateName(name); err != nil {
		return nil, err
	}
	var out *Key
	err := s.update(ctx, name, func(tx KeyTx) ([]*AuditRecord, error) {
		k := tx.Key()
		if u.PatchPolicy != nil {
			kind, err := s.kinds.Lookup(k.Kind)
			if err != nil {
				return nil, err
			}
			p, err := u.PatchPolicy(k.Policy)
			if err != nil {
				return nil, err
			}
			if !sameThreshold(p.Threshold, k.Policy.Threshold) {
				return nil, Errorf(KindInvalid, "threshold is set when a key is created and never changes (its parties hold the shares)")
			}
			if p, err = s.checkPolicy(kind, p); err != nil {
				return nil, err
			}
			if _, he := kind.(DecryptingKind); he && EffectiveDecryptBudget(p.DecryptBudget) > EffectiveDecryptBudget(k.Policy.DecryptBudget) {
				// Flooding is sized for the budget: decryptions already
				// answered were flooded for the smaller one, and more
				// would exceed what that flooding covers.
				return nil, Errorf(KindInvalid, "decrypt_budget can be lowered, not raised (from %d to %d): each decryption's noise flooding was sized for the budget in force; create a new key with the budget you need (README: What decryption reveals)", EffectiveDecryptBudget(k.Policy.DecryptBudget), EffectiveDecryptBudget(p.DecryptBudget))
			}
			k.Policy = p
			if p.RotationPeriod > 0 && k.LatestCreatedAt.IsZero() {
				// A header from before LatestCreatedAt: the schedule
				// starts from the latest version's creation.
				v, err := tx.Version(k.Latest)
				if err != nil {
					return nil, err
				}
				k.LatestCreatedAt = v.CreatedAt
			}
		}
		if u.MinDecryptionVersion != nil {
			m := *u.MinDecryptionVersion
			if m < 1 || m > k.Primary {
				return nil, Errorf(KindInvalid, "min_decryption_version must be between 1 and the primary version %d", k.Primary)
			}
			k.MinDecryptionVersion = m
		}
		out = k.Clone()
		return auditFor(c.rec, name, 0), nil
	})
	return out, err
}

func sameThreshold(a, b *ThresholdPolicy) bool {
	if a == nil || b == nil {
		return a == b
	}
	return a.T == b.T && slices.Equal(a.Parties, b.Parties) && slices.Equal(a.Requesters, b.Requesters)
}

// UpdateKey is For(nil).UpdateKey.
func (s *Service) UpdateKey(ctx context.Context, name string, u KeyUpdate) (*Key, error) {
	return s.For(nil).UpdateKey(ctx, name, u)
}

// update runs fn in one store transaction and maps store errors.
func (s *Service) update(ctx context.Context, name string, fn func(tx KeyTx) ([]*AuditRecord, error)) error {
	err := s.store.UpdateKey(ctx, name, fn)
	if errors.Is(err, ErrNotFound) && KindOf(err) != KindNotFound {
		return Errorf(KindNotFound, "key %q not found", name)
	}
	if err != nil {
		return asUnavailable("store", err)
	}
	return nil
}

// Rotate creates a new version and makes it primary. Material is generated
// and sealed first; the new version and the primary change then commit in
// one transaction, so a failure at any point leaves the key as it was.
func (c Call) Rotate(ctx context.Context, name string) (*Key, *Version, error) {
	s := c.Service
	if err := ValidateName(name); err != nil {
		return nil, nil, err
	}
	return s.rotate(ctx, name, c.rec)
}

// Rotate is For(nil).Rotate.
func (s *Service) Rotate(ctx context.Context, name string) (*Key, *Version, error) {
	return s.For(nil).Rotate(ctx, name)
}

// maxRotateAttempts bounds how often a rotation starts over after another
// replica added a version first; between attempts it waits a random while,
// longer each time (up to 32 ms), so that replicas rotating one key at once
// stop colliding in step.
const maxRotateAttempts = 64

func (s *Service) rotate(ctx context.Context, name string, rec *AuditRecord) (*Key, *Version, error) {
	// The lock saves this process's own rotations from racing; rotations
	// on other replicas are caught by the store's compare-and-swap, and
	// the loser starts over with the next number (its material was sealed
	// for the number it lost).
	mu := s.keyLock(name)
	mu.Lock()
	defer mu.Unlock()
	for attempt := 1; ; attempt++ {
		k, err := s.getKey(ctx, name)
		if err != nil {
			return nil, nil, err
		}
		kind, err := s.kinds.Lookup(k.Kind)
		if err != nil {
			return nil, nil, Wrap(KindInternal, "rotate", err)
		}
		if k.Policy.Threshold != nil {
			return nil, nil, Errorf(KindFailedPrecondition, "key %q is a threshold key: its parties make the next version together (RotateThreshold)", name)
		}
		n := k.Latest + 1
		v, release, err := s.newVersion(ctx, name, kind, n, k.Policy)
		if err != nil {
			return nil, nil, err
		}
		var out *Key
		raced := false
		err = s.update(ctx, name, func(tx KeyTx) ([]*AuditRecord, error) {
			k := tx.Key()
			if k.Latest+1 != n {
				raced = true
				return nil, Errorf(KindFailedPrecondition, "key %q changed during rotation; retry", name)
			}
			if err := tx.AddVersion(v.Clone()); err != nil {
				return nil, err
			}
			k.Primary, k.LatestCreatedAt = n, v.CreatedAt
			out = k.Clone()
			return auditFor(rec, name, n), nil
		})
		release()
		if err != nil {
			s.discard(kind, v)
			if raced && attempt < maxRotateAttempts && ctx.Err() == nil {
				time.Sleep(time.Duration(mrand.Int64N(int64(min(attempt, 32)) * int64(time.Millisecond))))
				continue
			}
			return nil, nil, err
		}
		return out, &v, nil
	}
}

// resolve returns the key's header and version n of it (0 means the
// primary), from the read cache: shared values, read only.
func (s *Service) resolve(ctx context.Context, name string, n uint64) (*Key, *Version, error) {
	k, err := s.cachedKey(ctx, name)
	if err != nil {
		return nil, nil, s.keyErr(name, err)
	}
	if n == 0 {
		n = k.Primary
	}
	if !k.HasVersion(n) {
		return nil, nil, Errorf(KindNotFound, "key %q has no version %d", name, n)
	}
	v, err := s.cachedVersion(ctx, name, n)
	if errors.Is(err, ErrNotFound) {
		return nil, nil, Errorf(KindNotFound, "key %q has no version %d", name, n)
	}
	if err != nil {
		return nil, nil, asUnavailable("store", err)
	}
	return k, v, nil
}

// PublicKey returns version n (0: primary) of a key, with its public key, if
// the version is usable.
func (s *Service) PublicKey(ctx context.Context, name string, n uint64) (*Key, *Version, error) {
	if err := ValidateName(name); err != nil {
		return nil, nil, err
	}
	k, v, err := s.resolve(ctx, name, n)
	if err != nil {
		return nil, nil, err
	}
	if _, err := transition(k, v, ActUse, s.clock.Now()); err != nil {
		return nil, nil, err
	}
	return k, v, nil
}

// SetVersionState applies a state action (disable, enable, schedule-destroy,
// cancel-destroy) to version n. days is the destroy waiting period for
// schedule-destroy (0: the key's policy).
func (c Call) SetVersionState(ctx context.Context, name string, n uint64, action Action, days int) (*Version, error) {
	s := c.Service
	if err := ValidateName(name); err != nil {
		return nil, err
	}
	switch action {
	case ActDisable, ActEnable, ActScheduleDestroy, ActCancelDestroy:
	default:
		return nil, Errorf(KindInvalid, "unknown action %q", action)
	}
	if action == ActScheduleDestroy && days != 0 && (days < MinDestroyWaitDays || days > MaxDestroyWaitDays) {
		return nil, Errorf(KindInvalid, "days must be between %d and %d", MinDestroyWaitDays, MaxDestroyWaitDays)
	}
	var out Version
	err := s.update(ctx, name, func(tx KeyTx) ([]*AuditRecord, error) {
		k := tx.Key()
		v, err := tx.Version(n)
		if err != nil {
			return nil, err
		}
		now := s.clock.Now()
		st, err := transition(k, v, action, now)
		if err != nil {
			return nil, err
		}
		v.State = st
		switch action {
		case ActScheduleDestroy:
			d := days
			if d == 0 {
				d = k.Policy.DestroyWaitDays
			}
			at := now.Add(time.Duration(d) * 24 * time.Hour)
			v.DestroyAt = &at
		case ActCancelDestroy:
			v.DestroyAt = nil
		}
		out = *v
		out.Sealed = nil
		return auditFor(c.rec, name, n), nil
	})
	if err != nil {
		return nil, err
	}
	if out.State != StateEnabled {
		s.cache.evict(name, n)
	}
	return &out, nil
}

// SetVersionState is For(nil).SetVersionState.
func (s *Service) SetVersionState(ctx context.Context, name string, n uint64, action Action, days int) (*Version, error) {
	return s.For(nil).SetVersionState(ctx, name, n, action, days)
}

// DestroyDue erases the sealed material of every version whose destroy time
// has come (crypto-shredding); metadata stays. It returns how many versions
// it destroyed. The store's schedule index names the due versions, so the
// cost follows what is due, not how many versions exist.
func (s *Service) DestroyDue(ctx context.Context) (int, error) {
	destroyed := 0
	for {
		now := s.clock.Now()
		refs, err := s.store.DueVersions(ctx, now, 100)
		if err != nil {
			return destroyed, asUnavailable("store", err)
		}
		byKey := map[string][]uint64{}
		var names []string
		for _, r := range refs {
			if _, ok := byKey[r.Key]; !ok {
				names = append(names, r.Key)
			}
			byKey[r.Key] = append(byKey[r.Key], r.Version)
		}
		progress := 0
		for _, name := range names {
			var nums []uint64
			var shred []string
			err := s.update(ctx, name, func(tx KeyTx) ([]*AuditRecord, error) {
				nums, shred = nums[:0], shred[:0]
				k := tx.Key()
				var recs []*AuditRecord
				for _, n := range byKey[name] {
					v, err := tx.Version(n)
					if err != nil || v.State == StateDestroyed {
						continue
					}
					st, err := transition(k, v, ActDestroy, now)
					if err != nil {
						continue
					}
					clear(v.Sealed)
					v.State, v.Sealed, v.DestroyAt = st, nil, nil
					// The switching keys from this version's secret go
					// with it (README: Re-keying without decryption):
					// with a later version's secret they would give
					// this one's back. Dropped from the version's blobs
					// here, removed once committed (or by the orphan
					// sweep at start if kmsd stops in between).
					if ext, err := extensionOf(v); err == nil {
						for _, sw := range ext.SwitchingKeys {
							if i := slices.Index(v.Blobs, sw.Digest); i >= 0 {
								v.Blobs = slices.Delete(slices.Clone(v.Blobs), i, i+1)
								shred = append(shred, sw.Digest)
							}
						}
					}
					t := now
					v.DestroyedAt = &t
					nums = append(nums, v.Number)
					recs = append(recs, s.systemRecord("destroy due version", k.Name, v.Number)...)
				}
				return recs, nil
			})
			if err != nil {
				return destroyed, err
			}
			if len(shred) > 0 {
				if k, err := s.getKey(ctx, name); err == nil {
					if kk, ok := s.kinds[k.Kind].(KeysetKind); ok {
						kk.RemoveBlobs(shred)
					}
				}
			}
			for _, n := range nums {
				s.cache.evict(name, n)
				s.log.Info("key version destroyed", "key", name, "version", n)
			}
			destroyed += len(nums)
			progress += len(nums)
		}
		// A full batch that destroyed nothing would come back the same:
		// stop rather than spin on it (the store's index disagrees with
		// the versions; the next run tries again).
		if len(refs) < 100 || progress == 0 {
			return destroyed, nil
		}
	}
}

// systemRecord is the audit record of an action the service takes on its
// own, or nil when auditing is off.
func (s *Service) systemRecord(op, key string, version uint64) []*AuditRecord {
	if !s.audit {
		return nil
	}
	return []*AuditRecord{{Time: s.clock.Now().UTC().Format(time.RFC3339Nano), Actor: "system", Operation: op, Key: key, Version: version, Status: 200}}
}

// RunDestruction calls DestroyDue every interval until ctx ends: the part
// of the maintenance one replica does for all (while it leads).
func (s *Service) RunDestruction(ctx context.Context, interval time.Duration) {
	var lastPrune time.Time
	s.every(ctx, interval, s.destroyDue, func(ctx context.Context) {
		// Expired access tokens, every pruneEvery at most (it reads
		// every token record).
		if now := s.clock.Now(); now.Sub(lastPrune) >= pruneEvery || now.Before(lastPrune) {
			lastPrune = now
			if n, err := s.PruneAccessTokens(ctx); err != nil && ctx.Err() == nil {
				s.log.Error("pruning expired access tokens", "err", err)
			} else if n > 0 {
				s.log.Info("pruned expired access tokens", "count", n)
			}
		}
	})
}

// pruneEvery is how often the replica that leads destruction prunes
// expired access tokens.
const pruneEvery = 10 * time.Minute

// RunTokenUseFlush calls FlushTokenUse every interval until ctx ends: the
// part every replica does for the uses it saw.
func (s *Service) RunTokenUseFlush(ctx context.Context, interval time.Duration) {
	s.every(ctx, interval, s.flushTokenUse)
}

func (s *Service) destroyDue(ctx context.Context) {
	if _, err := s.DestroyDue(ctx); err != nil && ctx.Err() == nil {
		s.log.Error("destroying due key versions", "err", err)
	}
}

func (s *Service) flushTokenUse(ctx context.Context) {
	if err := s.FlushTokenUse(ctx); err != nil && ctx.Err() == nil {
		s.log.Error("writing down token use", "err", err)
	}
}

func (s *Service) every(ctx context.Context, interval time.Duration, fns ...func(context.Context)) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		for _, fn := range fns {
			fn(ctx)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// privateKey returns the loaded private key of version v, from the cache or
// by unsealing it.
func (s *Service) privateKey(ctx context.Context, k *Key, v *Version, kind KeyKind) (PrivateKey, error) {
	if pk, ok := s.cache.get(k.Name, v.Number); ok {
		s.counts.keyHits.Add(1)
		return pk, nil
	}
	s.counts.keyMisses.Add(1)
	if v.Sealed == nil {
		return nil, Errorf(KindFailedPrecondition, "version %d of key %q has no material", v.Number, k.Name)
	}
	secret, err := s.sealer.Unseal(ctx, SealContext{Key: k.Name, Version: v.Number, Kind: k.Kind}, v.Sealed)
	if err != nil {
		return nil, asUnavailable("unseal", err)
	}
	defer secret.Wipe()
	pk, err := kind.Load(secret)
	if err != nil {
		return nil, Wrap(KindInternal, "load "+k.Kind, err)
	}
	s.cache.put(k.Name, v.Number, pk)
	return pk, nil
}

// usable resolves version n (0: primary) of a key for op and checks the
// policy and state.
func (s *Service) usable(ctx context.Context, name string, n uint64, op Operation) (*Key, *Version, KeyKind, error) {
	k, v, err := s.resolve(ctx, name, n)
	if err != nil {
		return nil, nil, nil, err
	}
	kind, err := s.kinds.Lookup(k.Kind)
	if err != nil {
		return nil, nil, nil, Wrap(KindInternal, string(op), err)
	}
	if !slices.Contains(kind.Operations(), op) {
		return nil, nil, nil, Errorf(KindFailedPrecondition, "key %q is of kind %s, which cannot %s", name, k.Kind, op)
	}
	if !k.Policy.Allows(op) {
		return nil, nil, nil, Errorf(KindFailedPrecondition, "the policy of key %q does not allow %s", name, op)
	}
	if _, err := transition(k, v, ActUse, s.clock.Now()); err != nil {
		return nil, nil, nil, err
	}
	return k, v, kind, nil
}

// Sign signs msg with the primary version of a signing key.
func (s *Service) Sign(ctx context.Context, name string, msg, context []byte) ([]byte, uint64, error) {
	if err := ValidateName(name); err != nil {
		return nil, 0, err
	}
	return s.sign(ctx, name, msg, context)
}

func (s *Service) sign(ctx context.Context, name string, msg, context []byte) ([]byte, uint64, error) {
	if len(context) > 255 {
		return nil, 0, Errorf(KindInvalid, "context must be at most 255 bytes")
	}
	k, v, kind, err := s.usable(ctx, name, 0, OpSign)
	if err != nil {
		return nil, 0, err
	}
	pk, err := s.privateKey(ctx, k, v, kind)
	if err != nil {
		return nil, 0, err
	}
	sig, err := kind.(SigningKind).Sign(s.rand, pk, msg, context)
	if err != nil {
		return nil, 0, Wrap(KindInternal, "sign", err)
	}
	return sig, v.Number, nil
}

// Verify checks sig over msg with version n of a signing key.
func (s *Service) Verify(ctx context.Context, name string, n uint64, msg, context, sig []byte) (bool, error) {
	if err := ValidateName(name); err != nil {
		return false, err
	}
	if n == 0 {
		return false, Errorf(KindInvalid, "version is required to verify")
	}
	if len(context) > 255 {
		return false, Errorf(KindInvalid, "context must be at most 255 bytes")
	}
	_, v, kind, err := s.usable(ctx, name, n, OpVerify)
	if err != nil {
		return false, err
	}
	ok, err := kind.(SigningKind).Verify(v.PublicKey, msg, context, sig)
	if err != nil {
		return false, Wrap(KindInternal, "verify", err)
	}
	return ok, nil
}

// Decapsulate recovers the shared secret of ciphertext with version n of a
// KEM key.
func (s *Service) Decapsulate(ctx context.Context, name string, n uint64, ciphertext []byte) (Secret, error) {
	if err := ValidateName(name); err != nil {
		return Secret{}, err
	}
	if n == 0 {
		return Secret{}, Errorf(KindInvalid, "version is required to decapsulate")
	}
	k, v, kind, err := s.usable(ctx, name, n, OpDecapsulate)
	if err != nil {
		return Secret{}, err
	}
	pk, err := s.privateKey(ctx, k, v, kind)
	if err != nil {
		return Secret{}, err
	}
	return kind.(KEMKind).Decapsulate(pk, ciphertext)
}
