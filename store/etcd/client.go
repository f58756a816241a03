package etcd

import (
	"crypto/tls"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	grpcbackoff "google.golang.org/grpc/backoff"
)

// ReconnectMax is the longest the client waits between attempts to reach
// an etcd member it lost: once etcd is back, kmsd is connected again
// within about this long. gRPC's default grows to 2 minutes, so after an
// outage of half a minute kmsd stayed unready for ten seconds or more
// after etcd came back.
const ReconnectMax = time.Second

// ClientConfig is the etcd client configuration kmsd uses: reconnects
// capped at ReconnectMax, keepalive pings that notice a silent member in
// 13 s at most, and no client logging (its retries reach kmsd as errors,
// which kmsd logs). tls may be nil for plain http.
func ClientConfig(endpoints []string, tls *tls.Config) clientv3.Config {
	return clientv3.Config{
		Endpoints:            endpoints,
		TLS:                  tls,
		DialTimeout:          5 * time.Second,
		DialKeepAliveTime:    10 * time.Second, // etcd refuses pings more often than every 5 s
		DialKeepAliveTimeout: 3 * time.Second,
		DialOptions: []grpc.DialOption{grpc.WithConnectParams(grpc.ConnectParams{
			Backoff:           grpcbackoff.Config{BaseDelay: 100 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: ReconnectMax},
			MinConnectTimeout: 2 * time.Second,
		})},
		Logger: zap.NewNop(),
	}
}
