//! Calls `EchoService.Echo` through a real Volo client and prints each call's latency: the first
//! call to a function at zero instances includes its cold start.
//!
//! usage: echo-call [ADDR (default 127.0.0.1:8888)] [CALLS (default 5)] [SERVICE (default echo)]
#![forbid(unsafe_code)]

use std::{net::SocketAddr, time::Instant};

use fnmesh_tests::gen::volo_gen::echo::{EchoRequest, EchoServiceClientBuilder};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let addr: SocketAddr = args
        .next()
        .as_deref()
        .unwrap_or("127.0.0.1:8888")
        .parse()
        .expect("ADDR is ip:port");
    let calls: usize = args.next().and_then(|n| n.parse().ok()).unwrap_or(5);
    let service = args.next().unwrap_or_else(|| "echo".into());
    let client = EchoServiceClientBuilder::new(service).address(addr).build();
    for i in 1..=calls {
        let started = Instant::now();
        let reply = client
            .echo(EchoRequest {
                message: format!("hello {i}").into(),
                sleep_ms: None,
                meta: None,
            })
            .await;
        let ms = started.elapsed().as_secs_f64() * 1e3;
        match reply {
            Ok(volo_thrift::MaybeException::Ok(r)) => println!(
                "call {i}: {ms:.2} ms  reply {:?} from instance {}{}",
                r.message.as_str(),
                r.instance.as_deref().unwrap_or("?"),
                if i == 1 {
                    "  (first call: includes any cold start)"
                } else {
                    ""
                }
            ),
            Ok(volo_thrift::MaybeException::Exception(e)) => {
                println!("call {i}: {ms:.2} ms  exception {e:?}")
            }
            Err(e) => println!("call {i}: {ms:.2} ms  error: {e}"),
        }
    }
}
